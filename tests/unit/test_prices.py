"""The price table: the packaged copy equals cluster/prices.yaml, it covers the cluster's instance types, overrides
merge field by field, every mistake names the file and the entry, and nodes are priced from their labels."""
from pathlib import Path

import pytest
import yaml

from mmray.config import ConfigError
from mmray.cost import prices
from mmray.cost.prices import INSTANCE_LABEL, MARKET_LABEL, PriceError

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("g5.xlarge", "g5.2xlarge", "g5.12xlarge", "g5.48xlarge", "g6.xlarge", "g6.12xlarge", "g6e.xlarge",
            "p4d.24xlarge", "p5.48xlarge", "local")


def test_packaged_copy_is_identical_to_cluster_prices():
    assert prices.packaged_text() == (REPO / "cluster" / "prices.yaml").read_text(encoding="utf-8"), \
        "edit cluster/prices.yaml and copy it to mmray/cost/prices.yaml"


def test_packaged_table_covers_the_cluster_and_is_sane():
    table = prices.load()
    assert table.as_of and "AWS" in table.source
    cluster = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())
    used = {nt["node_config"]["InstanceType"] for nt in cluster["available_node_types"].values()}
    assert used <= set(table.instances), used - set(table.instances)
    head = cluster["available_node_types"][cluster["head_node_type"]]["node_config"]["InstanceType"]
    assert table.head_instance_type == head
    for name in REQUIRED:
        inst = table.get(name)
        assert inst.spot_usd_per_hour <= inst.on_demand_usd_per_hour, name
        if inst.gpus:
            assert inst.gpu_memory_gib == table.gpu_types[inst.gpu_type].memory_gib, name
    assert table.get("local").on_demand_usd_per_hour == 0.0  # unlabelled nodes cost nothing unless overridden
    assert table.get("g5.xlarge").gpus == 1 and table.get("p5.48xlarge").gpus == 8


@pytest.mark.parametrize("labels, expected", [
    ({INSTANCE_LABEL: "g5.xlarge", MARKET_LABEL: "spot"}, ("g5.xlarge", "spot", 0.40, "table")),
    ({INSTANCE_LABEL: "g5.xlarge", MARKET_LABEL: "on-demand"}, ("g5.xlarge", "on-demand", 1.006, "table")),
    ({INSTANCE_LABEL: "g5.xlarge", MARKET_LABEL: "ON_DEMAND"}, ("g5.xlarge", "on-demand", 1.006, "table")),
    ({INSTANCE_LABEL: "g5.xlarge"}, ("g5.xlarge", "on-demand", 1.006, "table")),  # unknown market: the dearer one
    ({}, ("local", "on-demand", 0.0, "local")),
    ({INSTANCE_LABEL: "unknown", MARKET_LABEL: "spot"}, ("local", "spot", 0.0, "local")),
    ({INSTANCE_LABEL: "local"}, ("local", "on-demand", 0.0, "local")),
    ({INSTANCE_LABEL: "x9.huge", MARKET_LABEL: "spot"}, ("x9.huge", "spot", 55.04, "unknown-type")),
])
def test_nodes_are_priced_from_their_labels(labels, expected):
    p = prices.load().price_node(labels)
    assert (p.instance_type, p.market, p.usd_per_hour, p.priced_by) == pytest.approx(expected)


def test_override_merges_field_by_field(tmp_path, monkeypatch):
    f = tmp_path / "mine.yaml"
    f.write_text("as_of: '2026-01-02'\n"
                 "instances:\n"
                 "  g5.xlarge: {spot_usd_per_hour: 0.37}\n"
                 "  local: {on_demand_usd_per_hour: 1.5, spot_usd_per_hour: 1.5}\n"
                 "  onprem.a100: {on_demand_usd_per_hour: 2, spot_usd_per_hour: 2, gpus: 4, gpu_type: A100-40GB,\n"
                 "                vcpus: 64, memory_gib: 512, gpu_memory_gib: 40}\n")
    table = prices.load(str(f))
    assert table.get("g5.xlarge").spot_usd_per_hour == 0.37
    assert table.get("g5.xlarge").on_demand_usd_per_hour == 1.006  # untouched field kept
    assert table.get("local").usd_per_hour("on-demand") == 1.5
    assert table.get("onprem.a100").gpus == 4
    assert table.as_of == "2026-01-02" and str(f) in table.path
    monkeypatch.setenv(prices.PRICES_ENV, str(f))
    assert prices.load().get("g5.xlarge").spot_usd_per_hour == 0.37  # the environment variable
    other = tmp_path / "other.yaml"
    other.write_text("instances:\n  g5.xlarge: {spot_usd_per_hour: 0.5}\n")
    assert prices.load(str(other)).get("g5.xlarge").spot_usd_per_hour == 0.5  # the config key wins over the env


@pytest.mark.parametrize("text, needles", [
    ("instances:\n  g5.xlarge: {spot_usd_per_hour: cheap}\n", ["instances.g5.xlarge.spot_usd_per_hour", "'cheap'"]),
    ("instances:\n  g5.xlarge: {spot_usd_per_hour: -1}\n", ["instances.g5.xlarge.spot_usd_per_hour", ">= 0"]),
    ("instances:\n  g5.xlarge: {gpus: 1.5}\n", ["instances.g5.xlarge.gpus", "whole number"]),
    ("instances:\n  g5.xlarge: {spot: 0.3}\n", ["instances.g5.xlarge", "unknown field", "spot_usd_per_hour"]),
    ("instances:\n  new.type: {spot_usd_per_hour: 1}\n", ["instances.new.type", "lacks", "on_demand_usd_per_hour"]),
    ("instances:\n  g5.xlarge: {gpu_type: B200}\n", ["instances.g5.xlarge.gpu_type", "'B200'", "A10G"]),
    ("instances:\n  g5.xlarge: 3\n", ["instances.g5.xlarge", "mapping"]),
    ("head_instance_type: z1.nano\n", ["head_instance_type", "'z1.nano'"]),
    ("spot_prices: {}\n", ["unknown top-level key", "spot_prices"]),
    ("instances: [1, 2\n", ["not valid YAML"]),
    ("- a\n", ["must be a mapping"]),
])
def test_bad_override_names_the_file_and_entry(tmp_path, text, needles):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(PriceError) as e:
        prices.load(str(f))
    assert str(f) in str(e.value)
    for needle in needles:
        assert needle in str(e.value)


def test_missing_override_is_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):  # PriceError is a ConfigError: the CLI exits 2
        prices.load(str(tmp_path / "missing.yaml"))
