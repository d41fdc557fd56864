"""ray-cluster.yaml: valid for Ray's own autoscaler schema, and safe (spot/on-demand split, IMDSv2, labels,
token auth, no credentials, no Ray port open to the world).

Fast and offline: Ray's schema validation, a dry run of the start commands with stub `curl`/`ray`, and Ray's
AWS bootstrap against the moto server on 127.0.0.1.
"""
from __future__ import annotations

import copy
import re
import stat
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray._private.label_utils import parse_node_labels_string
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray-cluster.yaml"

MARKET_KEY = "ray.io/market-type"          # Ray's reserved label key (ray._raylet.RAY_NODE_MARKET_TYPE_KEY)
ZONE_KEY = "ray.io/availability-zone"      # ray._raylet.RAY_NODE_ZONE_KEY
INSTANCE_KEY = "mmray/instance-type"       # ours: what the cost meter looks up in the price table
RAY_PORTS = {6379, 8265, 10001}            # GCS, dashboard / job API, Ray client
WORLD = {"0.0.0.0/0", "::/0"}
GPU_FAMILIES = ("g", "p", "trn", "inf", "dl")


def _raw() -> str:
    return CLUSTER_YAML.read_text()


def _load() -> dict:
    return yaml.safe_load(_raw())


@pytest.fixture(scope="module")
def cfg() -> dict:
    return _load()


def _node_types(cfg):
    return cfg["available_node_types"]


def _is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def _workers(cfg):
    return {k: v for k, v in _node_types(cfg).items() if k != cfg["head_node_type"]}


# ----------------------------------------------------------------------------- Ray's own validation

def test_ray_schema_accepts_the_config(cfg):
    prepared = prepare_config(copy.deepcopy(cfg))  # fills Ray's AWS defaults, merges setup commands
    validate_config(prepared)                       # jsonschema (ray-schema.json) + Ray's cross-checks
    assert prepared["provider"] == {**cfg["provider"]}
    assert prepared["cluster_name"] == "mmray"
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"] == "us-east-1"


@pytest.mark.parametrize("breakage", [
    "unknown top-level key",
    "unknown node-type key",
    "head type not declared",
    "negative max_workers",
    "non-string label value",
])
def test_ray_schema_rejects_a_broken_config(cfg, breakage):
    """The validation above can fail: each of these edits must be refused by Ray itself."""
    bad = copy.deepcopy(cfg)
    worker = next(iter(_workers(bad)))
    if breakage == "unknown top-level key":
        bad["not_a_ray_key"] = True
    elif breakage == "unknown node-type key":
        bad["available_node_types"][worker]["market"] = "spot"
    elif breakage == "head type not declared":
        bad["head_node_type"] = "no_such_type"
    elif breakage == "negative max_workers":
        bad["max_workers"] = -1
    elif breakage == "non-string label value":
        bad["available_node_types"][worker]["labels"] = {INSTANCE_KEY: 1}
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validate_config(prepare_config(bad))


# ----------------------------------------------------------------------------- node types

def test_head_is_on_demand_cpu_only(cfg):
    head = _node_types(cfg)[cfg["head_node_type"]]
    nc = head["node_config"]
    assert "InstanceMarketOptions" not in nc, "the head must never be spot"
    assert "SpotOptions" not in nc
    assert head["resources"].get("GPU") == 0, "pin GPU: 0 so no training worker lands on the head"
    assert head["resources"].get("CPU", 1) > 0, "drivers and Tune run on the head"
    assert not nc["InstanceType"].startswith(GPU_FAMILIES), nc["InstanceType"]
    assert head.get("max_workers", 0) == 0
    assert head["labels"][MARKET_KEY] == "on-demand"


def test_spot_gpu_workers(cfg):
    spot = {k: v for k, v in _workers(cfg).items() if _is_spot(v)}
    assert spot, "expected at least one spot GPU worker type"
    for name, nt in spot.items():
        assert nt["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert nt["resources"].get("GPU", 0) >= 1, name
        assert nt["labels"][MARKET_KEY] == "spot", name
        assert nt["node_config"]["InstanceType"].startswith(GPU_FAMILIES), name


def test_on_demand_gpu_fallback_exists_and_ranks_below_spot(cfg):
    workers = _workers(cfg)
    on_demand = {k: v for k, v in workers.items() if not _is_spot(v) and v["resources"].get("GPU", 0) >= 1}
    assert on_demand, "expected an on-demand GPU worker type to fall back to"
    for name, nt in on_demand.items():
        assert nt["labels"][MARKET_KEY] == "on-demand", name
    spot_priorities = [v.get("priority", 0) for v in workers.values() if _is_spot(v)]
    assert max(v.get("priority", 0) for v in on_demand.values()) < min(spot_priorities)
    assert all(v.get("min_workers", 0) == 0 for v in workers.values()), "no GPU idles by default"
    assert sum(v.get("max_workers", 0) for v in workers.values()) >= cfg["max_workers"] > 0


def test_node_type_labels_match_node_config(cfg):
    for name, nt in _node_types(cfg).items():
        labels = nt["labels"]
        assert labels[INSTANCE_KEY] == nt["node_config"]["InstanceType"], name
        assert labels[MARKET_KEY] == ("spot" if _is_spot(nt) else "on-demand"), name


def test_imdsv2_required_everywhere(cfg):
    for name, nt in _node_types(cfg).items():
        md = nt["node_config"].get("MetadataOptions", {})
        assert md.get("HttpTokens") == "required", name
        assert md.get("HttpEndpoint", "enabled") == "enabled", name  # the start commands read IMDS


def test_instance_profiles_are_named_not_embedded(cfg):
    for name, nt in _node_types(cfg).items():
        profile = nt["node_config"].get("IamInstanceProfile")
        assert profile and set(profile) <= {"Name", "Arn"}, name
    head = _node_types(cfg)[cfg["head_node_type"]]["node_config"]["IamInstanceProfile"]
    workers = {nt["node_config"]["IamInstanceProfile"].get("Name") for nt in _workers(cfg).values()}
    assert head.get("Name") not in workers, "workers must not get the head's EC2 launch rights"


# ----------------------------------------------------------------------------- security

def test_no_credentials_in_file(cfg):
    raw = _raw()
    assert not re.search(r"(?<![A-Z0-9])(AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])", raw)
    assert "aws_secret_access_key" not in raw.lower()
    assert "aws_session_token" not in raw.lower()
    assert "aws_credentials" not in cfg["provider"]
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", raw), "the Ray token travels as a file, never inline"
    assert "BEGIN RSA PRIVATE KEY" not in raw and "ssh_private_key" not in cfg.get("auth", {})


def _ingress_opens_ray_port_to_world(rule: dict) -> bool:
    cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
    if not cidrs & WORLD:
        return False
    if str(rule.get("IpProtocol")) == "-1":
        return True
    lo, hi = int(rule.get("FromPort", 0)), int(rule.get("ToPort", 65535))
    return any(lo <= p <= hi for p in RAY_PORTS)


def test_ingress_opens_no_ray_port_to_the_world(cfg):
    # The checker itself must catch the dangerous shapes.
    assert _ingress_opens_ray_port_to_world({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
                                             "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    assert _ingress_opens_ray_port_to_world({"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]})
    assert not _ingress_opens_ray_port_to_world({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                                 "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not _ingress_opens_ray_port_to_world(rule), rule


def test_every_node_type_uses_the_dedicated_group(cfg):
    """Ray's auto-created group always adds SSH from 0.0.0.0/0 (aws/config.py), so no node type may rely on it."""
    groups = {tuple(nt["node_config"].get("SecurityGroupIds") or ()) for nt in _node_types(cfg).values()}
    assert len(groups) == 1 and all(groups), groups


def test_token_auth_is_wired(cfg):
    mounts = cfg["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    for cmd in _ray_start_commands(cfg):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    setup = " ".join(cfg["setup_commands"])
    assert "RAY_AUTH_MODE=token" in setup and "chmod 600 ~/.ray/auth_token" in setup


def test_pinned_installs(cfg):
    head = " ".join(cfg["head_setup_commands"])
    worker = " ".join(cfg["worker_setup_commands"])
    for cmds in (head, worker):
        assert re.search(r'torch==\d+\.\d+\.\d+', cmds)
        assert re.search(r'ray\[[^\]]*\]==\d+\.\d+\.\d+', cmds)
        assert cmds.index("torch==") < cmds.index("ray["), "torch first, so no other torch build is pulled"
    import ray

    assert f"=={ray.__version__}" in head, "cluster Ray must equal the local Ray"


# ----------------------------------------------------------------------------- start commands and labels

def _ray_start_commands(cfg):
    return [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]


def test_every_ray_start_passes_labels_with_market_type(cfg):
    starts = _ray_start_commands(cfg)
    assert len(starts) == 2
    for cmd in starts:
        m = re.search(r'--labels="([^"]+)"', cmd)
        assert m, cmd
        keys = [kv.split("=", 1)[0] for kv in m.group(1).split(",")]
        assert MARKET_KEY in keys and INSTANCE_KEY in keys, keys


FAKE_IMDS = {
    "api/token": "imds-session-token",
    "meta-data/instance-life-cycle": "spot",
    "meta-data/instance-type": "g5.xlarge",
    "meta-data/placement/availability-zone": "us-east-1b",
}


def _stub_bin(tmp_path: Path, imds: dict = FAKE_IMDS, ray_start_rc: int = 0) -> Path:
    """`curl` answering like IMDSv2 (only with the session token), `ray` recording its argv (and exiting with
    `ray_start_rc` for `ray start`), `python` recording its argv (the spot watcher's start)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cases = "\n".join(f'    *{path}) echo -n "{value}" ;;' for path, value in imds.items())
    curl = f"""#!/bin/bash
args="$*"
case "$args" in *api/token*) ;; *"X-aws-ec2-metadata-token: {imds['api/token']}"*) ;; *) exit 22 ;; esac
case "$args" in
{cases}
    *) exit 22 ;;
esac
"""
    ray = f"""#!/bin/bash
{{ printf '%s\\n' "RAY_AUTH_MODE=$RAY_AUTH_MODE"; printf '%s\\n' "$@"; echo ---; }} >> "{tmp_path}/ray_calls"
[ "$1" = start ] && exit {ray_start_rc}
exit 0
"""
    python = f"""#!/bin/bash
{{ printf '%s\\n' "$@"; echo ---; }} > "{tmp_path}/python_argv" && mv "{tmp_path}/python_argv" "{tmp_path}/python_calls"
"""
    for name, body in (("curl", curl), ("ray", ray), ("python", python)):
        p = bin_dir / name
        p.write_text(body)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run_start_commands(cmds: list[str], tmp_path: Path, bin_dir: Path, check: bool = True) -> list[int]:
    """Run each command in bash as Ray's updater would, with /tmp/ray/ moved under tmp_path; their exit codes."""
    (tmp_path / "ray" / "session_latest" / "logs").mkdir(parents=True, exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RAY_HEAD_IP": "10.0.0.5"}
    codes = []
    for cmd in cmds:
        cmd = cmd.replace("/tmp/ray/", f"{tmp_path}/ray/")
        codes.append(subprocess.run(["bash", "-c", cmd], env=env, check=check, timeout=10,
                                    capture_output=True).returncode)
    return codes


def _watcher_argv(tmp_path: Path, wait_s: float) -> list[str] | None:
    """The argv the start commands gave `python` (started in the background), None if none within wait_s."""
    calls = tmp_path / "python_calls"
    deadline = time.monotonic() + wait_s
    while not calls.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return calls.read_text().split("---")[0].split() if calls.exists() else None


@pytest.mark.parametrize("which", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_run_and_yield_valid_labels(cfg, tmp_path, which):
    """Run the start commands in bash with stub curl/ray: the labels come out of IMDSv2 and parse in Ray."""
    bin_dir = _stub_bin(tmp_path)
    _run_start_commands(cfg[which], tmp_path, bin_dir)
    calls = [c.strip().splitlines() for c in (tmp_path / "ray_calls").read_text().split("---") if c.strip()]
    start = [c for c in calls if len(c) > 1 and c[1] == "start"]
    assert len(start) == 1, calls
    argv = start[0]
    assert argv[0] == "RAY_AUTH_MODE=token"
    labels_arg = [a for a in argv if a.startswith("--labels=")]
    assert len(labels_arg) == 1, argv
    labels = parse_node_labels_string(labels_arg[0].split("=", 1)[1])  # Ray's own parser and syntax check
    assert labels == {MARKET_KEY: "spot", INSTANCE_KEY: "g5.xlarge", ZONE_KEY: "us-east-1b"}
    if which == "head_start_ray_commands":
        assert "--head" in argv
        assert _watcher_argv(tmp_path, wait_s=0) is None, "the on-demand head runs no spot watcher"
    else:
        assert "--address=10.0.0.5:6379" in argv
        # A spot worker starts the interruption watcher after `ray start`, in the background, logging to a file.
        watcher = _watcher_argv(tmp_path, wait_s=10)
        assert watcher is not None, "the spot worker's start commands did not start the watcher"
        assert watcher[:2] == ["-m", "mmray.node.spot"], watcher
        assert "--ray-address=10.0.0.5:6379" in watcher
        assert any(a.startswith("--pidfile=") for a in watcher), watcher
        start_cmd = next(c for c in cfg[which] if "ray start" in c)
        assert re.search(r"nohup python -m mmray\.node\.spot [^&]*>>\S+mmray-spot-watch\.log 2>&1 </dev/null &",
                         start_cmd), start_cmd


@pytest.mark.parametrize("market, ray_start_rc", [("on-demand", 0), ("spot", 1)])
def test_watcher_only_on_spot_workers_whose_ray_started(cfg, tmp_path, market, ray_start_rc):
    """An on-demand worker gets no watcher; a failed `ray start` still fails the command and starts no watcher."""
    bin_dir = _stub_bin(tmp_path, {**FAKE_IMDS, "meta-data/instance-life-cycle": market}, ray_start_rc)
    codes = _run_start_commands(cfg["worker_start_ray_commands"], tmp_path, bin_dir, check=False)
    assert codes[-1] == ray_start_rc, "the start command's status must stay that of `ray start`"
    assert _watcher_argv(tmp_path, wait_s=1) is None


# ----------------------------------------------------------------------------- Ray's AWS bootstrap (moto)

def test_ray_aws_bootstrap_keeps_the_dedicated_group_closed(cfg, s3_endpoint, tmp_path, monkeypatch):
    """Create the group as cluster/README.md says, run Ray's AWS bootstrap on this config: Ray must use the
    group as it is (no SSH from 0.0.0.0/0 added, no Ray port opened) and fill subnets and the key pair."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws

    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes the generated SSH key under ~/.ssh
    ec2 = boto3.client("ec2", region_name=cfg["provider"]["region"], endpoint_url=s3_endpoint)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    sg = ec2.create_security_group(GroupName=f"mmray-cluster-{tmp_path.name}"[:60],
                                   Description="mmray cluster", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": "203.0.113.7/32", "Description": "ssh from the operator"}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg, "Description": "intra-cluster"}]},
    ])
    before = ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]["IpPermissions"]

    prepared = prepare_config(copy.deepcopy(cfg))
    for nt in prepared["available_node_types"].values():
        assert nt["node_config"]["SecurityGroupIds"] != [sg]
        nt["node_config"]["SecurityGroupIds"] = [sg]  # the README's "fill in your group id" step
    out = bootstrap_aws(prepared)

    after = ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]["IpPermissions"]
    assert after == before
    for rule in after:
        cidrs = {r["CidrIp"] for r in rule.get("IpRanges", [])}
        assert not cidrs & WORLD, rule
    names = [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]]
    assert not any(n.startswith("ray-autoscaler") for n in names), names
    for name, nt in out["available_node_types"].items():
        nc = nt["node_config"]
        assert nc["SecurityGroupIds"] == [sg], name
        assert nc["SubnetIds"], name
        assert nc["IamInstanceProfile"] == cfg["available_node_types"][name]["node_config"]["IamInstanceProfile"]
        assert nc["MetadataOptions"]["HttpTokens"] == "required"
    assert Path(out["auth"]["ssh_private_key"]).is_relative_to(tmp_path)
