"""cluster/: the on-prem config passes Ray's own validation with the same roles and labels as ray-cluster.yaml, the
IAM policies are least-privilege, and the KubeRay manifest has the head and GPU group, labels and no public service.

Offline and fast: Ray's schema validation and parsing only.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from ray._private.label_utils import parse_node_labels_string
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
MARKET_KEY, INSTANCE_KEY = "ray.io/market-type", "mmray/instance-type"
DATA_PREFIX = "arn:aws:s3:::YOUR-BUCKET/data/*"
RUNS_PREFIX = "arn:aws:s3:::YOUR-BUCKET/mmray-runs/*"


def _labels_of(cmd: str) -> dict:
    m = re.search(r'--labels="([^"]+)"', cmd)
    assert m, cmd
    return parse_node_labels_string(m.group(1))  # Ray's own parser and syntax check


def _no_credentials(raw: str) -> None:
    assert not re.search(r"(?<![A-Z0-9])(AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])", raw)
    assert "aws_secret_access_key" not in raw.lower() and "BEGIN" not in raw
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?\w{8,}", raw)


# ----------------------------------------------------------------------------- on-prem (Ray's local provider)

@pytest.fixture(scope="module")
def onprem() -> dict:
    return yaml.safe_load((CLUSTER / "onprem.yaml").read_text())


def test_onprem_passes_ray_validation(onprem):
    prepared = prepare_config(copy.deepcopy(onprem))  # the local provider's own preparation (prepare_local)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["max_workers"] == len(onprem["provider"]["worker_ips"])


def test_onprem_roles_labels_and_token_auth(onprem):
    heads = [c for c in onprem["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in onprem["worker_start_ray_commands"] if "ray start" in c]
    assert len(heads) == len(workers) == 1
    head, worker = heads[0], workers[0]
    assert "--head" in head and "--num-gpus=0" in head, "no training worker may land on the head"
    for cmd in (head, worker):
        labels = _labels_of(cmd)
        assert labels[MARKET_KEY] == "on-demand"
        assert labels[INSTANCE_KEY] == "local"  # priced by the price table's `local` entry
        assert "RAY_AUTH_MODE=token" in cmd
    assert "dashboard-host" not in head, "the dashboard stays on the head's 127.0.0.1 (reach it with ray dashboard)"
    assert onprem["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in " ".join(onprem["setup_commands"])
    _no_credentials((CLUSTER / "onprem.yaml").read_text())


def test_onprem_labels_price_as_local():
    from mmray.cost import prices

    onprem = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    labels = _labels_of([c for c in onprem["worker_start_ray_commands"] if "ray start" in c][0])
    assert prices.load().price_node(labels).priced_by == "local"


# ----------------------------------------------------------------------------- IAM

def _statements(name: str) -> list[dict]:
    doc = json.loads((CLUSTER / "iam" / name).read_text())
    assert doc["Version"] == "2012-10-17"
    return doc["Statement"]


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


@pytest.mark.parametrize("name", ["head-policy.json", "worker-policy.json"])
def test_s3_rights_are_least_privilege(name):
    s3 = [s for s in _statements(name) if any(a.startswith("s3:") for a in _as_list(s["Action"]))]
    assert s3 and all(s["Effect"] == "Allow" for s in _statements(name))
    for s in _statements(name):
        for action in _as_list(s["Action"]):
            assert action != "*" and not action.endswith(":*") and "*" not in action.split(":")[0], action
        assert "NotAction" not in s and "NotResource" not in s
    rights: dict[str, set[str]] = {}
    for s in s3:
        for action in _as_list(s["Action"]):
            assert "*" not in action, f"{name}: wildcard S3 action {action}"
            for resource in _as_list(s["Resource"]):
                assert resource.startswith("arn:aws:s3:::YOUR-BUCKET"), resource
                rights.setdefault(resource, set()).add(action)
    assert rights[DATA_PREFIX] == {"s3:GetObject"}, "the data prefix is read-only"
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= rights[RUNS_PREFIX]
    assert set(rights) == {DATA_PREFIX, RUNS_PREFIX, "arn:aws:s3:::YOUR-BUCKET"}, set(rights)
    assert rights["arn:aws:s3:::YOUR-BUCKET"] == {"s3:ListBucket"}
    listing = [s for s in s3 if "s3:ListBucket" in _as_list(s["Action"])]
    assert all(s["Condition"]["StringLike"]["s3:prefix"] for s in listing), "listing is limited to the prefixes"


def test_workers_get_no_ec2_or_iam_rights():
    actions = {a for s in _statements("worker-policy.json") for a in _as_list(s["Action"])}
    assert all(a.startswith("s3:") for a in actions), actions


def test_head_can_run_the_autoscaler_and_nothing_more():
    statements = _statements("head-policy.json")
    actions = {a for s in statements for a in _as_list(s["Action"])}
    # What Ray 2.60's AWS node provider calls (aws/node_provider.py): list, launch, tag, terminate, pass the role.
    assert {"ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:RunInstances", "ec2:CreateTags",
            "ec2:TerminateInstances", "iam:PassRole"} <= actions
    assert not {a for a in actions if a.startswith("ec2:") and not a.startswith("ec2:Describe")} - {
        "ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances"}
    for s in statements:
        acts = _as_list(s["Action"])
        if "ec2:TerminateInstances" in acts:
            assert s["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == "mmray"
        if "iam:PassRole" in acts:
            assert _as_list(s["Resource"]) == ["arn:aws:iam::YOUR-ACCOUNT-ID:role/mmray-worker"]
            assert s["Condition"]["StringEquals"]["iam:PassedToService"] == "ec2.amazonaws.com"
        if any(not a.startswith(("ec2:Describe", "s3:")) for a in acts):
            assert "*" != s["Resource"], f"{s['Sid']}: a mutating action on every resource"


def test_readme_documents_the_placeholders():
    readme = (CLUSTER / "README.md").read_text()
    for placeholder in ("YOUR-BUCKET", "YOUR-ACCOUNT-ID", "YOUR-SECURITY-GROUP-ID", "iam/head-policy.json",
                        "iam/worker-policy.json"):
        assert placeholder in readme, placeholder


# ----------------------------------------------------------------------------- KubeRay

@pytest.fixture(scope="module")
def kuberay() -> dict:
    return yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())


def test_kuberay_is_a_raycluster_with_head_and_gpu_group(kuberay):
    import ray

    assert kuberay["apiVersion"] == "ray.io/v1" and kuberay["kind"] == "RayCluster"
    spec = kuberay["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_labels = parse_node_labels_string(head["rayStartParams"]["labels"])
    assert head_labels[MARKET_KEY] == "on-demand"
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                                    for c in g["template"]["spec"]["containers"])]
    assert gpu, "expected a GPU worker group"
    for g in gpu:
        labels = parse_node_labels_string(g["rayStartParams"]["labels"])
        assert labels[MARKET_KEY] in ("spot", "on-demand") and labels[INSTANCE_KEY]
        selector = g["template"]["spec"]["nodeSelector"]
        assert selector["node.kubernetes.io/instance-type"] == labels[INSTANCE_KEY], "labels must match the node"
        assert g["minReplicas"] == 0
    for group in [head, *groups]:
        for c in group["template"]["spec"]["containers"]:
            assert c["image"].endswith(ray.__version__) or f":{ray.__version__}-" in c["image"], c["image"]
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], "the token comes from a Secret"


def test_kuberay_exposes_nothing_outside_the_cluster(kuberay):
    spec = kuberay["spec"]
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    raw = (CLUSTER / "kuberay.yaml").read_text()
    assert "LoadBalancer" not in raw and "NodePort" not in raw and "hostNetwork" not in raw
    assert "ingress" not in {k.lower() for k in spec["headGroupSpec"]}
    _no_credentials(raw)
