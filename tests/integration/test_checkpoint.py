"""Checkpoints under real Ray Train + DeepSpeed: partial or tampered ones are refused and the run falls back to the
previous complete one; a malicious pickle never runs; export consolidates ZeRO-2 shards bit for bit (ZeRO-3: the
stage-3 run of test_train.py)."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mmray import config
from mmray.export import export, load
from mmray.train.engine import load_checkpoint_file
from mmray.train.trainer import train

from export_check import assert_export_matches, reference_state
from tiny_config import GLOBAL, tiny_cfg

RUN = "ckpt"


def _cfg(data, storage, *overrides):
    return tiny_cfg(data, storage, f"run.name={RUN}", *overrides)


@pytest.fixture(scope="module")
def zero2_run(ray_session, tiny_dataset, tmp_path_factory):
    """One finished ZeRO-2 run with checkpoints at steps 2 and 4 (and the best by loss in best/); tests copy it
    before changing anything."""
    storage = tmp_path_factory.mktemp("zero2")
    summary = train(_cfg(tiny_dataset, storage, "train.zero_stage=2", "run.keep_best=1"))
    assert summary["checkpoint"].endswith("checkpoint_00000004")
    (storage / "summary.json").write_text(json.dumps(summary))
    return storage


def _copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest / RUN / "checkpoint_00000004"


def _truncate(ckpt):
    p = ckpt / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(ckpt):
    p = ckpt / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


TAMPERS = {
    "truncated-shard": (_truncate, "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt has"),
    "deleted-rank-manifest": (lambda c: (c / "manifest.rank1.json").unlink(), "manifest.rank1.json is missing"),
    "flipped-byte": (_flip_byte, "ds/mp_rank_00_model_states.pt does not match its sha256"),
}


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_tampered_checkpoint_is_refused_with_the_reason(zero2_run, tmp_path, kind):
    """The check restore runs (no Ray needed): the newest complete checkpoint is the previous one, and why."""
    import pyarrow.fs as pafs

    from mmray.train.checkpoint import latest_complete

    tamper, reason = TAMPERS[kind]
    latest = _copy_run(zero2_run, tmp_path / "runs")
    tamper(latest)
    rejected: list[str] = []
    assert latest_complete(str(latest.parent), pafs.LocalFileSystem(), rejected=rejected) == "checkpoint_00000002"
    assert len(rejected) == 1 and rejected[0].startswith("checkpoint_00000004: ") and reason in rejected[0]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_a_shard_is_refused_at_restore(zero2_run, tiny_dataset, tmp_path):
    latest = _copy_run(zero2_run, tmp_path / "runs")
    marker = tmp_path / "pwned"
    shard = latest / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {}, "evil": _Exploit(marker)}, shard)
    # An attacker who can write the checkpoint can rewrite its manifest too: the manifest passes, the loader refuses.
    manifest = json.loads((latest / "manifest.rank0.json").read_text())
    data = shard.read_bytes()
    manifest["files"]["ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"] = {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (latest / "manifest.rank0.json").write_text(json.dumps(manifest))

    with pytest.raises(Exception) as err:
        train(_cfg(tiny_dataset, tmp_path / "runs", "train.zero_stage=2", "train.max_failures=0"))
    rank0 = str(getattr(err.value, "worker_failures", {}).get(0, err.value))
    assert "refusing to load checkpoint checkpoint_00000004" in rank0 and "posix.system" in rank0
    assert not marker.exists()


def test_export_zero2_is_bit_identical_and_loads(zero2_run, tmp_path, s3_bucket):
    run_dir = zero2_run / RUN
    checkpoint = run_dir / "checkpoint_00000004"
    reference = reference_state(checkpoint)
    # With fp32 ZeRO-2, the module weights the engine trained are the consolidated fp32 partitions.
    module = load_checkpoint_file(str(checkpoint / "ds" / "mp_rank_00_model_states.pt"))["module"]
    for name, tensor in reference.items():
        assert torch.equal(module[name], tensor), name

    summary = export(str(run_dir), str(tmp_path / "fp32"))  # a run directory means its newest complete checkpoint
    assert summary["checkpoint"] == str(checkpoint) and summary["step"] == 4
    manifest = json.loads((tmp_path / "fp32" / "manifest.json").read_text())
    for name in ("model.safetensors", "config.yaml", "tokenizer.json"):
        assert manifest["files"][name]["sha256"] == hashlib.sha256((tmp_path / "fp32" / name).read_bytes()).hexdigest()
    assert_export_matches(tmp_path / "fp32", reference)

    bf16 = export(str(checkpoint), f"s3://{s3_bucket}/exports/bf16", dtype="bf16")
    assert bf16["dtype"] == "bf16"
    model, _, _ = load(f"s3://{s3_bucket}/exports/bf16")
    import boto3
    from safetensors.torch import load as load_bytes

    blob = boto3.client("s3").get_object(Bucket=s3_bucket, Key="exports/bf16/model.safetensors")["Body"].read()
    weights = load_bytes(blob)
    for name, tensor in reference.items():
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], tensor.to(torch.bfloat16))
        assert torch.equal(model.state_dict()[name], tensor.to(torch.bfloat16).float())  # widened exactly


def test_export_refuses_tampered_files(zero2_run, tmp_path):
    from mmray.export import ExportError

    latest = _copy_run(zero2_run, tmp_path / "runs")
    _flip_byte(latest)
    with pytest.raises(ExportError, match="mp_rank_00_model_states.pt does not match its sha256"):
        export(str(latest), str(tmp_path / "out"))
    # The run directory falls back to the previous complete checkpoint.
    assert export(str(latest.parent), str(tmp_path / "out"))["step"] == 2
    (tmp_path / "out" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ExportError, match="config.yaml does not match"):
        load(str(tmp_path / "out"))


def test_cli_export(zero2_run, tmp_path, capsys):
    from mmray.cli import main

    assert main(["export", str(zero2_run / RUN), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["dtype"] == "bf16" and "model.safetensors" in summary["files"]
    assert main(["export", str(tmp_path / "no-such-run"), str(tmp_path / "out2")]) == 2
    assert "error" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_reproduces_the_training_evaluation(zero2_run, tiny_dataset, tmp_path, capsys):
    """`mmray eval` on the run directory and on its export gives the metrics the training run reported for the same
    held-out samples: same model, same data path, same metric code."""
    from mmray.cli import main

    trained = json.loads((zero2_run / "summary.json").read_text())["metrics"]
    export(str(zero2_run / RUN), str(tmp_path / "export"))
    for model in (zero2_run / RUN, tmp_path / "export"):
        assert main(["eval", str(model), "--data", tiny_dataset, "--max-samples", "64"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        m = summary["metrics"]
        assert m["eval_pairs"] == 64 and summary["bad"] == {} and summary["fusion"] == "late"
        for key in ("i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@10", "zero_shot_acc"):
            assert m[key] == pytest.approx(trained[f"val_{key}"], abs=1e-6), key
    # Only evaluation keys may be overridden; a bad model path is bad input.
    assert main(["eval", str(tmp_path / "export"), "--data", tiny_dataset, "model.fusion=early"]) == 2
    assert "only eval.* keys" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert main(["eval", str(tmp_path / "nothing"), "--data", tiny_dataset]) == 2


def test_keep_best_copies_the_best_checkpoint_of_the_run(zero2_run):
    """The loop ranks each checkpoint by the loss reported with it (run.keep_best=1): the best is a complete copy."""
    from mmray.train.checkpoint import BEST_DIR, read_best_index, verify

    import pyarrow.fs as pafs

    index = read_best_index(str(zero2_run / RUN), pafs.LocalFileSystem())
    assert index["metric"] == "loss" and index["mode"] == "min" and len(index["scores"]) == 1
    (name, loss), = index["scores"].items()
    final_loss = json.loads((zero2_run / "summary.json").read_text())["metrics"]["loss"]
    assert name == "checkpoint_00000004" and loss == final_loss or name == "checkpoint_00000002" and loss < final_loss
    assert sorted(p.name for p in (zero2_run / RUN / BEST_DIR).iterdir()) == ["best.json", name]
    assert verify(str(zero2_run / RUN / BEST_DIR / name))["step"] == int(name[-8:])


@pytest.mark.parametrize("override, trained, now", [
    ("model.image_heads=2", "model.image_heads=4", "model.image_heads=2"),  # same shapes: would load silently
    ("model.image_depth=3", "model.image_depth=1", "model.image_depth=3"),  # a shape mismatch on every worker
    ("train.zero_stage=3", "train.zero_stage=2", "train.zero_stage=3"),     # DeepSpeed's empty AssertionError
])
def test_resuming_with_another_model_is_refused_before_ray_naming_the_keys(zero2_run, tiny_dataset, tmp_path,
                                                                           override, trained, now):
    import ray

    _copy_run(zero2_run, tmp_path / "runs")
    cfg = _cfg(tiny_dataset, tmp_path / "runs", "train.zero_stage=2", "train.max_steps=6", override)
    groups = len(ray.util.placement_group_table())
    with pytest.raises(config.ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"run {RUN} resumes from checkpoint_00000004, which was trained with {trained}")
    assert f"this config has {now}. A checkpoint resumes only with the model" in message
    assert len(ray.util.placement_group_table()) == groups  # refused before any Ray Train run started


def test_tampered_latest_falls_back_to_previous_and_resumes_on_fewer_workers(zero2_run, tiny_dataset, tmp_path):
    """The newest checkpoint is truncated: the run resumes from the previous complete one, says why, and keeps the
    refused directory. 2 workers wrote it (ZeRO-2); 1 resumes it (universal checkpoint) and trains on."""
    latest = _copy_run(zero2_run, tmp_path / "runs")
    _truncate(latest)
    summary = train(_cfg(tiny_dataset, tmp_path / "runs", "train.zero_stage=2", "train.max_steps=6",
                         "train.num_workers=1", "train.max_failures=0"))
    m = summary["metrics"]
    assert m["restored_from"] == "checkpoint_00000002" and m["resumed_from_step"] == 2
    assert len(m["rejected_checkpoints"]) == 1
    assert m["rejected_checkpoints"][0].startswith("checkpoint_00000004: ")
    assert TAMPERS["truncated-shard"][1] in m["rejected_checkpoints"][0]
    assert summary["steps"] == 6 and summary["samples_seen"] == 2 * GLOBAL + 4 * (GLOBAL // 2)
    # The refused directory is never reused: the new step-4 checkpoint got a fresh name (run.keep_last=2 then lets
    # Ray Train delete the refused one with the other older checkpoints).
    assert (latest.parent / "checkpoint_00000004_r1").is_dir()
    assert summary["checkpoint"].endswith("checkpoint_00000006")
