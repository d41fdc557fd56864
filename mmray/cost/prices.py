"""The price table: instance type -> $/hour on each market, GPUs and memory, and how a Ray node is priced.

The packaged table (``mmray/cost/prices.yaml``, a copy of ``cluster/prices.yaml``) is the default. A user override
(``budget.prices`` in the config, else the ``MMRAY_PRICES`` environment variable) is merged over it entry by entry
and field by field, so it only states what differs (today's spot price, an on-prem hourly figure). A new instance
type in an override must be complete. Every problem is a :class:`PriceError` that names the file and the entry.

A Ray node is priced from its labels (set by ``ray start --labels``, see ray-cluster.yaml):
``mmray/instance-type`` names the table entry and ``ray.io/market-type`` (``spot`` / ``on-demand``) the market.
A node without an instance-type label (a laptop, CI, a hand-started raylet) is priced as the ``local`` entry
($0 unless overridden). A labelled type that the table lacks is priced at the table's highest on-demand price and
flagged: a budget must never be kept by pricing an unknown machine at nothing.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from mmray import storage
from mmray.config import ConfigError

PRICES_ENV = "MMRAY_PRICES"
INSTANCE_LABEL = "mmray/instance-type"   # ours, set from EC2 metadata by ray-cluster.yaml's start commands
MARKET_LABEL = "ray.io/market-type"      # Ray's reserved key (ray._raylet.RAY_NODE_MARKET_TYPE_KEY)
ZONE_LABEL = "ray.io/availability-zone"  # ray._raylet.RAY_NODE_ZONE_KEY
LOCAL = "local"
MARKETS = ("on-demand", "spot")
_UNLABELLED = ("", "unknown")            # what the start commands write when the metadata could not be read


class PriceError(ConfigError):
    """A price table (or override) is wrong; the message names the file and the entry. Bad input: exit code 2."""


@dataclass(frozen=True)
class InstancePrice:
    """One instance type. Prices are USD per instance-hour; gpu_memory_gib is per GPU."""

    name: str
    on_demand_usd_per_hour: float
    spot_usd_per_hour: float
    gpus: int
    gpu_type: str
    vcpus: int
    memory_gib: float
    gpu_memory_gib: float
    approximate: bool = False
    note: str = ""

    def usd_per_hour(self, market: str) -> float:
        return self.spot_usd_per_hour if normalize_market(market) == "spot" else self.on_demand_usd_per_hour


@dataclass(frozen=True)
class GpuType:
    """A GPU model: memory and peak dense BF16 TFLOPS (only ratios of the latter are used)."""

    name: str
    memory_gib: float
    bf16_tflops: float
    approximate: bool = False


@dataclass(frozen=True)
class NodePrice:
    """How one Ray node was priced."""

    instance_type: str
    market: str
    usd_per_hour: float
    priced_by: str  # "table", "local" (no instance-type label) or "unknown-type" (labelled, not in the table)


@dataclass(frozen=True)
class PriceTable:
    as_of: str
    source: str
    head_instance_type: str
    instances: dict[str, InstancePrice]
    gpu_types: dict[str, GpuType]
    path: str  # where it came from ("packaged" plus the override path, if any)

    def get(self, name: str) -> InstancePrice:
        try:
            return self.instances[name]
        except KeyError:
            raise PriceError(f"instance type {name!r} is not in the price table ({self.path}); known: "
                             f"{', '.join(self.instances)}.") from None

    def max_on_demand(self) -> float:
        return max(i.on_demand_usd_per_hour for i in self.instances.values())

    def price_node(self, labels: Mapping[str, str]) -> NodePrice:
        """Price a Ray node from its labels (see the module docstring for the rules)."""
        market = normalize_market(labels.get(MARKET_LABEL, "on-demand"))
        name = labels.get(INSTANCE_LABEL, "")
        if name in _UNLABELLED or name == LOCAL:
            return NodePrice(LOCAL, market, self.get(LOCAL).usd_per_hour(market), "local")
        if name in self.instances:
            return NodePrice(name, market, self.instances[name].usd_per_hour(market), "table")
        return NodePrice(name, market, self.max_on_demand(), "unknown-type")

    def to_dict(self) -> dict:
        return {"as_of": self.as_of, "source": self.source, "head_instance_type": self.head_instance_type,
                "path": self.path,
                "gpu_types": {k: dataclasses.asdict(v) for k, v in self.gpu_types.items()},
                "instances": {k: dataclasses.asdict(v) for k, v in self.instances.items()}}


def normalize_market(value: str) -> str:
    """'spot', 'SPOT' -> 'spot'; 'on-demand', 'ON_DEMAND', 'on_demand' -> 'on-demand'. Anything else is on-demand
    (the dearer market: a node of unknown market is never priced low)."""
    v = str(value).strip().lower().replace("_", "-")
    return "spot" if v == "spot" else "on-demand"


# ----------------------------------------------------------------------------------------------------------- loading

_INSTANCE_FIELDS = {  # name -> (type, required)
    "on_demand_usd_per_hour": (float, True), "spot_usd_per_hour": (float, True), "gpus": (int, True),
    "gpu_type": (str, True), "vcpus": (int, True), "memory_gib": (float, True), "gpu_memory_gib": (float, True),
    "approximate": (bool, False), "note": (str, False),
}
_GPU_FIELDS = {"memory_gib": (float, True), "bf16_tflops": (float, True), "approximate": (bool, False)}
_TOP_KEYS = {"as_of", "source", "currency", "region", "head_instance_type", "gpu_types", "instances"}


def packaged_text() -> str:
    """The packaged default table, as text."""
    return importlib.resources.files("mmray.cost").joinpath("prices.yaml").read_text(encoding="utf-8")


def _parse(text: str, where: str) -> dict:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PriceError(f"price table {where} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PriceError(f"price table {where} must be a mapping, got {type(raw).__name__}.")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise PriceError(f"price table {where}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
                         f"allowed: {', '.join(sorted(_TOP_KEYS))}.")
    for section in ("instances", "gpu_types"):
        if not isinstance(raw.get(section, {}), dict):
            raise PriceError(f"price table {where}: {section} must be a mapping of name -> fields.")
        for name, entry in raw.get(section, {}).items():
            if not isinstance(entry, dict):
                raise PriceError(f"price table {where}: {section}.{name} must be a mapping of fields, got {entry!r}.")
    return raw


def _value(where: str, key: str, value: Any, typ: type) -> Any:
    bad = PriceError(f"price table {where}: {key} must be {_TYPE_WORDS[typ]}, got {value!r}.")
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if typ is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if typ is int and not float(value).is_integer():
        raise bad
    if not math.isfinite(value) or value < 0:
        raise bad
    return typ(value)


_TYPE_WORDS = {float: "a number >= 0", int: "a whole number >= 0", str: "a string", bool: "true or false"}


def _entry(where: str, section: str, name: str, fields: Mapping[str, Any], spec: dict) -> dict:
    unknown = set(fields) - set(spec)
    if unknown:
        raise PriceError(f"price table {where}: {section}.{name} has unknown field(s) "
                         f"{', '.join(sorted(unknown))}; allowed: {', '.join(spec)}.")
    missing = [k for k, (_, required) in spec.items() if required and k not in fields]
    if missing:
        raise PriceError(f"price table {where}: {section}.{name} lacks {', '.join(missing)} (a new entry must be "
                         "complete; an override of a known entry may give only some fields).")
    return {k: _value(where, f"{section}.{name}.{k}", v, spec[k][0]) for k, v in fields.items()}


def _merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in extra.items():
        if key in ("instances", "gpu_types"):
            section = {k: dict(v) for k, v in out.get(key, {}).items()}
            for name, fields in value.items():
                section.setdefault(name, {}).update(fields)
            out[key] = section
        else:
            out[key] = value
    return out


def build(raw: dict, where: str) -> PriceTable:
    """Validate a (merged) raw table and build it."""
    instances = {str(n): InstancePrice(name=str(n), **_entry(where, "instances", str(n), f, _INSTANCE_FIELDS))
                 for n, f in raw.get("instances", {}).items()}
    gpu_types = {str(n): GpuType(name=str(n), **_entry(where, "gpu_types", str(n), f, _GPU_FIELDS))
                 for n, f in raw.get("gpu_types", {}).items()}
    if LOCAL not in instances:
        raise PriceError(f"price table {where}: instances.{LOCAL} is required (it prices unlabelled nodes).")
    for inst in instances.values():
        if inst.gpus and inst.gpu_type not in gpu_types:
            raise PriceError(f"price table {where}: instances.{inst.name}.gpu_type {inst.gpu_type!r} is not in "
                             f"gpu_types ({', '.join(gpu_types)}).")
        if inst.gpus and not inst.gpu_memory_gib:
            raise PriceError(f"price table {where}: instances.{inst.name}.gpu_memory_gib must be > 0 for a GPU type.")
    head = str(raw.get("head_instance_type", ""))
    if head and head not in instances:
        raise PriceError(f"price table {where}: head_instance_type {head!r} is not in instances.")
    for key in ("as_of", "source"):
        if not str(raw.get(key, "")).strip():
            raise PriceError(f"price table {where}: {key} is required (when and where the figures come from).")
    return PriceTable(as_of=str(raw["as_of"]), source=" ".join(str(raw["source"]).split()), head_instance_type=head,
                      instances=instances, gpu_types=gpu_types, path=where)


def override_path(config_path: str = "") -> str:
    """The override in force: ``budget.prices`` from the config, else ``$MMRAY_PRICES``, else none ("")."""
    return config_path or os.environ.get(PRICES_ENV, "")


def load(override: str = "") -> PriceTable:
    """The packaged table merged with ``override`` (a path, local or s3://; "" means ``$MMRAY_PRICES`` or none)."""
    base = _parse(packaged_text(), "packaged mmray/cost/prices.yaml")
    path = override_path(override)
    if not path:
        return build(base, "packaged mmray/cost/prices.yaml")
    try:
        text = storage.read_text(path)
    except (storage.StorageError, FileNotFoundError, IsADirectoryError) as e:
        raise PriceError(f"price override {path} cannot be read: {e}") from None
    return build(_merge(base, _parse(text, path)), f"packaged mmray/cost/prices.yaml + {path}")
