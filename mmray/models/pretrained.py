"""Fine-tuning helpers: start a tower from pretrained weights, and freeze towers.

A tower is ``model.image_encoder`` or ``model.text_encoder`` (``fusion.image_encoder.`` / ``fusion.text_encoder.``
in a whole model's state dict). Its weights come from ``model.init_image`` / ``model.init_text``, which name:

- a ``.safetensors`` file (preferred: read without unpickling, and only its header until tensors are needed);
- any other file, read with ``torch.load(weights_only=True)``: tensors and containers only, never pickled code.
  A flat ``{name: tensor}`` mapping, or one under a ``state_dict`` / ``module`` / ``model`` key;
- an mmray export directory (``mmray export``): its ``model.safetensors``, whose size is checked against the
  export's manifest (and its sha256 when the tensors are read).

``model.init_*_prefix`` selects the tower's keys inside the file and strips that prefix; ``auto`` takes the mmray
prefix when the file has keys under it (a whole mmray model), else none. The check is strict and reports every
missing, unexpected and mis-shaped key at once, naming the file, as a ConfigError (exit code 2).

Single-device code: the caller passes ``gather`` to reach parameters that a sharding wrapper has partitioned
(DeepSpeed ZeRO-3); nothing here imports Ray, DeepSpeed or torch.distributed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Mapping

import pyarrow.fs as pafs
import torch
from torch import nn

from mmray import storage
from mmray.config import ConfigError, ModelConfig

TOWERS = ("image", "text")
TOWER_PREFIX = {"image": "fusion.image_encoder.", "text": "fusion.text_encoder."}  # in a whole mmray model
EXPORT_WEIGHTS = "model.safetensors"  # what mmray.export writes (not imported: export pulls in the train package)
EXPORT_MANIFEST = "manifest.json"
_NESTED_STATE_KEYS = ("state_dict", "module", "model")  # common wrappers of a state dict in torch checkpoints
_MAX_SAFETENSORS_HEADER = 100 << 20
_LISTED = 8  # keys listed per kind of mismatch before "... and N more"

Gather = Callable[[list[nn.Parameter]], ContextManager]


def parse_freeze(value: str) -> tuple[str, ...]:
    """``model.freeze`` ('image,text') as tower names; a ConfigError names the bad entry and the allowed ones."""
    towers = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    for tower in towers:
        if tower not in TOWERS:
            raise ConfigError(f"model.freeze: {tower!r} is not a tower; allowed values: {', '.join(TOWERS)} "
                              f"(comma-separated, e.g. 'text' or 'image,text').")
    return towers


def tower_module(model: nn.Module, tower: str) -> nn.Module:
    return model.image_encoder if tower == "image" else model.text_encoder


def freeze(model: nn.Module, towers: Iterable[str]) -> int:
    """Turn off ``requires_grad`` in the named towers; returns how many parameters were frozen.

    Raises a ConfigError when nothing would be left to train.
    """
    towers = tuple(towers)
    frozen = 0
    for tower in towers:
        for p in tower_module(model, tower).parameters():
            p.requires_grad_(False)
            frozen += 1
    if towers and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.freeze={','.join(towers)} leaves no parameter to train with model.fusion="
                          f"{model.cfg.fusion}; freeze fewer towers.")
    return frozen


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's logical shape, also for a parameter that ZeRO-3 has partitioned (whose local data is empty)."""
    return tuple(getattr(t, "ds_shape", t.shape))


# -- reading weight files ------------------------------------------------------------------------------------------

class WeightsFile:
    """Names and shapes of a state-dict file, and its tensors on demand.

    A safetensors file is described from its header alone (a ranged read, also on S3) and downloaded and memory-mapped
    only when a tensor is asked for, so a rank that only checks keys reads a few kilobytes. A torch file is loaded
    whole, weights-only.
    """

    def __init__(self, path: str, *, key: str, expected: dict | None = None):
        self.path, self.key, self.expected = path, key, expected
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._local: str | None = None
        self._safe = None          # safetensors handle
        self._tensors: dict[str, torch.Tensor] | None = None  # torch file contents
        fs, inner = storage.resolve(path)
        info = fs.get_file_info(inner)
        if info.type != pafs.FileType.File:
            raise ConfigError(f"{key}: {path} is neither a weights file nor an mmray export directory (with "
                              f"{EXPORT_WEIGHTS} and {EXPORT_MANIFEST}).")
        size = info.size
        try:
            with fs.open_input_file(inner) as fh:
                head = fh.read(min(9, size))
                self.is_safetensors = len(head) == 9 and head[8:9] == b"{"
                if self.is_safetensors:
                    n = struct.unpack("<Q", head[:8])[0]
                    if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                        raise ValueError(f"its safetensors header claims {n} bytes")
                    header = json.loads(fh.read_at(n, 8))
        except (OSError, ValueError) as e:  # unreadable, or a corrupt header
            raise ConfigError(f"{key}: cannot read weights from {path}: {e}") from None
        if expected is not None and size != expected.get("bytes"):
            raise ConfigError(f"{key}: {path} has {size} bytes, its export's {EXPORT_MANIFEST} says "
                              f"{expected.get('bytes')} (truncated or altered).")
        if self.is_safetensors:
            header.pop("__metadata__", None)
            self.shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
        else:
            self._tensors = self._load_torch()
            self.shapes = {name: tuple(t.shape) for name, t in self._tensors.items()}

    def _local_path(self) -> str:
        """A local file with the weights: the path itself, or a download of an s3:// object (checked if exported)."""
        if self._local is None:
            if storage.is_s3(self.path) or self.expected is not None:
                fs, inner = storage.resolve(self.path)
                digest = hashlib.sha256()
                local = self.path
                if storage.is_s3(self.path):
                    self._tmp = tempfile.TemporaryDirectory(prefix="mmray-init-")
                    local = os.path.join(self._tmp.name, os.path.basename(inner))
                with fs.open_input_stream(inner, compression=None) as src, contextlib.ExitStack() as stack:
                    dst = stack.enter_context(open(local, "wb")) if local != self.path else None
                    while chunk := src.read(16 << 20):
                        digest.update(chunk)
                        if dst is not None:
                            dst.write(chunk)
                if self.expected is not None and digest.hexdigest() != self.expected.get("sha256"):
                    raise ConfigError(f"{self.key}: {self.path} does not match its sha256 in the export's "
                                      f"{EXPORT_MANIFEST} (altered or truncated).")
                self._local = local
            else:
                self._local = storage.resolve(self.path)[1]
        return self._local

    def _load_torch(self) -> dict[str, torch.Tensor]:
        local = self._local_path()
        try:
            try:
                obj = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(local, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(f"{self.key}: refusing to load {self.path}: it is not plain tensors and containers "
                              f"(torch.load with weights_only=True rejected it, so it could run code). Convert it to "
                              f".safetensors. {str(e).splitlines()[0]}") from None
        except Exception as e:  # noqa: BLE001 - a file torch cannot read at all is bad input too
            raise ConfigError(f"{self.key}: cannot read {self.path} as safetensors or a torch file: {e}") from None
        for key in _NESTED_STATE_KEYS:
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping) and not _is_state(obj):
                obj = obj[key]
        if not _is_state(obj):
            raise ConfigError(f"{self.key}: {self.path} does not hold a state dict (a mapping of names to tensors, "
                              f"possibly under one of {', '.join(_NESTED_STATE_KEYS)}).")
        return dict(obj)

    def tensor(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name]
        if self._safe is None:
            from safetensors import safe_open

            self._safe = safe_open(self._local_path(), framework="pt", device="cpu")
        return self._safe.get_tensor(name)

    def close(self) -> None:
        self._safe = self._tensors = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _is_state(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


# -- which file, which keys ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TowerSource:
    """Where one tower's pretrained weights come from, as configured."""

    tower: str
    path: str      # as given: a file or an export directory
    prefix: str    # 'auto', '' or a key prefix
    key: str       # the config key, for messages

    def open(self) -> tuple[WeightsFile, str]:
        """The weights file and the prefix to strip (``auto`` resolved)."""
        try:
            weights_path, expected = self.path, None
            manifest = storage.join(self.path, EXPORT_MANIFEST)
            if storage.exists(storage.join(self.path, EXPORT_WEIGHTS)):  # an export directory
                if not storage.exists(manifest):
                    raise ConfigError(f"{self.key}: {manifest} is missing: {self.path} is an unfinished mmray "
                                      "export.")
                expected = json.loads(storage.read_text(manifest)).get("files", {}).get(EXPORT_WEIGHTS) or {}
                weights_path = storage.join(self.path, EXPORT_WEIGHTS)
            weights = WeightsFile(weights_path, key=self.key, expected=expected)
        except (OSError, ValueError) as e:  # storage errors (a missing bucket, no network); ConfigError passes
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{self.key}: cannot read {self.path}: {e}") from None
        prefix = self.prefix
        if prefix == "auto":
            mmray_prefix = TOWER_PREFIX[self.tower]
            prefix = mmray_prefix if expected is not None or any(k.startswith(mmray_prefix) for k in weights.shapes) \
                else ""
        return weights, prefix


def tower_sources(cfg: ModelConfig) -> list[TowerSource]:
    """The towers that ``cfg`` initialises from pretrained weights."""
    return [TowerSource(tower, getattr(cfg, f"init_{tower}"), getattr(cfg, f"init_{tower}_prefix"),
                        f"model.init_{tower}") for tower in TOWERS if getattr(cfg, f"init_{tower}")]


def _tower_tensors(tower: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's parameters and persistent buffers, by state-dict name."""
    out = dict(tower.named_parameters())
    for module_name, module in tower.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[f"{module_name}.{name}" if module_name else name] = buf
    return out


def match_keys(source: TowerSource, weights: WeightsFile, prefix: str, tower: nn.Module) -> dict[str, str]:
    """Tower name -> file key, after checking that the file's keys under ``prefix`` are exactly the tower's, with its
    shapes. Every mismatch is reported in one ConfigError."""
    wanted = {name: full_shape(t) for name, t in _tower_tensors(tower).items()}
    found = {k[len(prefix):]: shape for k, shape in weights.shapes.items() if k.startswith(prefix)}
    where = weights.path + (f" (keys under '{prefix}')" if prefix else "")
    if prefix and not found:
        starts = sorted({k.split(".")[0] + "." for k in weights.shapes})
        raise ConfigError(f"{source.key}: no key of {weights.path} starts with '{prefix}' (its keys start with "
                          f"{_listing(starts)}); set {source.key}_prefix.")
    missing = [k for k in wanted if k not in found]
    unexpected = [k for k in found if k not in wanted]
    shapes = [f"{k}: file {list(found[k])} vs model {list(s)}" for k, s in wanted.items()
              if k in found and tuple(found[k]) != s]
    if missing or unexpected or shapes:
        lines = [f"{source.key}: {where} does not fit the {source.tower} tower "
                 f"({len(wanted)} tensors, {type(tower).__name__}):"]
        for label, items in (("missing from the file", missing), ("unexpected in the file", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                lines.append(f"  {label} ({len(items)}): {_listing(items)}")
        lines.append(f"  Match the model.{source.tower}_* keys (and data.image_size / data.max_text_len) to the "
                     f"weights, or set {source.key}_prefix to the prefix of the tower's keys in the file.")
        raise ConfigError("\n".join(lines))
    return {name: prefix + name for name in wanted}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def load_tower(model: nn.Module, source: TowerSource, *, gather: Gather | None = None, write: bool = True) -> int:
    """Copy pretrained weights into one tower of ``model``; returns the number of tensors loaded.

    Every caller checks the keys (so that every rank raises the same error). Module by module, ``gather(params)``
    makes partitioned parameters whole for the copy, and re-partitions them after it; with ``write`` False (a rank
    whose copy the gather discards) no parameter is read.
    """
    tower = tower_module(model, source.tower)
    weights, prefix = source.open()
    try:
        mapping = match_keys(source, weights, prefix, tower)
        with torch.no_grad():
            for module_name, module in tower.named_modules():
                local = dict(module.named_parameters(recurse=False))
                local.update(module.named_buffers(recurse=False))
                if not local:
                    continue
                params = [t for t in local.values() if isinstance(t, nn.Parameter)]
                with (gather(params) if gather is not None and params else contextlib.nullcontext()):
                    for name, t in local.items():
                        full = f"{module_name}.{name}" if module_name else name
                        # Buffers are never partitioned (nor broadcast): every rank writes its own.
                        if full in mapping and (write or not isinstance(t, nn.Parameter)):
                            t.copy_(weights.tensor(mapping[full]))
        return len(mapping)
    finally:
        weights.close()


def check_sources(cfg: ModelConfig, model: nn.Module) -> None:
    """Check every configured source against ``model`` without reading tensors, and that freezing leaves something
    to train (``model`` is frozen as a side effect). ``model`` may live on the meta device, so the driver can run this
    before any worker starts."""
    for source in tower_sources(cfg):
        weights, prefix = source.open()
        try:
            match_keys(source, weights, prefix, tower_module(model, source.tower))
        finally:
            weights.close()
    freeze(model, parse_freeze(cfg.freeze))


def save_tower(model: nn.Module, tower: str, path: str, prefix: str = "") -> None:
    """Write one tower's weights as a safetensors file (keys prefixed with ``prefix``); a local path or s3://."""
    from safetensors.torch import save

    state = {prefix + k: t.detach().contiguous().clone() for k, t in _tower_tensors(tower_module(model, tower)).items()}
    storage.write_bytes(path, save(state))

