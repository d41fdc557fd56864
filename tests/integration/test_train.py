"""Training under Ray Train with real DeepSpeed engines (gloo on CPU): ZeRO stages, checkpoints, resume, S3."""
import json
from pathlib import Path

import boto3
import pytest
from mmray import config
from mmray.data.prepare import prepare_synthetic
from mmray.models.fusion import FUSIONS
from mmray.train.engine import load_checkpoint_file
from mmray.train.trainer import train

from tiny_config import GLOBAL, WORKERS, tiny_cfg


def _cfg(data, storage, *overrides):
    return tiny_cfg(data, storage, *overrides)


def _files(checkpoint: str) -> set[str]:
    root = Path(checkpoint)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("stage, accum, deepspeed", [
    (2, 2, ["train.offload_optimizer=cpu", "train.activation_checkpointing=true"]),
    (3, 1, ["train.offload_optimizer=cpu", "train.offload_param=cpu"]),
])
def test_zero_stage_trains_and_checkpoints(ray_session, tiny_dataset, tmp_path, stage, accum, deepspeed):
    """Through the whole Ray Train path, with the DeepSpeed options on (tests/integration/test_deepspeed_options.py
    covers each combination, cheaper) and gradient accumulation feeding DeepSpeed's batch arithmetic."""
    # ZeRO-3 also generates captions and answers in its evaluation, which needs the partitioned parameters gathered.
    extra = ["model.decoder_depth=1", "model.vqa_weight=1", "eval.max_new_tokens=4"] if stage == 3 else []
    cfg = _cfg(tiny_dataset, tmp_path, f"train.zero_stage={stage}", f"train.grad_accum={accum}", *deepspeed, *extra)
    summary = train(cfg)

    assert summary["steps"] == 4
    assert summary["samples_seen"] == 4 * GLOBAL * accum
    assert summary["metrics"]["val_eval_pairs"] == 64
    assert 0.0 <= summary["metrics"]["val_i2t_r@1"] <= 1.0
    if stage == 3:
        assert summary["metrics"]["val_vqa_questions"] == 64 and "val_bleu4" in summary["metrics"]
    assert summary["checkpoint"].endswith("checkpoint_00000004")
    files = _files(summary["checkpoint"])
    # Every rank's optimizer shard is in the one merged checkpoint; ZeRO-3 also shards the parameters.
    for rank in range(WORKERS):
        assert f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        if stage == 3:
            assert f"ds/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in files
    assert {"state.json", "config.yaml", "tokenizer.json"} <= files
    state = json.loads((Path(summary["checkpoint"]) / "state.json").read_text())
    assert state == {"step": 4, "samples_seen": 4 * GLOBAL * accum, "samples_repeated": 0, "epoch": state["epoch"],
                     "emergency_checkpoints": 0, "preemptions": [], "world_size": WORKERS}
    # The data position: every rank's trained-on samples of the epoch, in the checkpoint, none twice.
    from mmray.data.position import read_consumed

    consumed = read_consumed(summary["checkpoint"])
    assert state["epoch"] == 0 and consumed.num_rows == 4 * GLOBAL * accum  # 4 steps of the 512 training samples
    assert len(set(zip(*consumed.to_pydict().values()))) == consumed.num_rows
    assert summary["samples_repeated"] == 0
    assert config.load(Path(summary["checkpoint"]) / "config.yaml") == cfg
    # Checkpoints are plain tensors and containers: they load with weights_only=True.
    for name in files:
        if name.endswith(".pt"):
            load_checkpoint_file(str(Path(summary["checkpoint"]) / name))


def test_rerun_resumes_from_latest_checkpoint(ray_session, tiny_dataset, tmp_path):
    first = train(_cfg(tiny_dataset, tmp_path, "run.name=resume"))
    assert first["steps"] == 4 and first["metrics"]["resumed_from_step"] == 0

    longer = train(_cfg(tiny_dataset, tmp_path, "run.name=resume", "train.max_steps=6"))
    assert longer["metrics"]["resumed_from_step"] == 4
    assert longer["steps"] == 6
    assert longer["samples_seen"] == 6 * GLOBAL
    assert longer["checkpoint"].endswith("checkpoint_00000006")

    # Running a finished run again trains nothing, re-evaluates, and reports the same model's figures.
    again = train(_cfg(tiny_dataset, tmp_path, "run.name=resume", "train.max_steps=6"))
    assert again["metrics"]["resumed_from_step"] == 6 and again["steps"] == 6
    assert again["checkpoint"].endswith("checkpoint_00000006_eval1")
    for key in ("val_i2t_r@1", "val_t2i_r@5"):
        assert again["metrics"][key] == pytest.approx(longer["metrics"][key])


def test_data_and_checkpoints_on_s3(ray_session, s3_bucket):
    data = f"s3://{s3_bucket}/datasets/shapes"
    prepare_synthetic(data, samples=400, seed=5, val_samples=64, samples_per_shard=200)
    cfg = _cfg(data, f"s3://{s3_bucket}/runs", "train.max_steps=2", "run.name=s3run")

    summary = train(cfg)
    assert summary["steps"] == 2 and summary["samples_seen"] == 2 * GLOBAL
    assert summary["run_dir"] == f"s3://{s3_bucket}/runs/s3run"

    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/s3run/")["Contents"]}
    prefix = "runs/s3run/checkpoint_00000002/"
    for name in ("state.json", "config.yaml", "tokenizer.json", "ds/mp_rank_00_model_states.pt",
                 "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        assert prefix + name in keys
    state = json.loads(s3.get_object(Bucket=s3_bucket, Key=prefix + "state.json")["Body"].read())
    assert state["step"] == 2

    again = train(cfg)  # resumes from the checkpoint in S3
    assert again["metrics"]["resumed_from_step"] == 2


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_every_fusion_strategy_trains_under_deepspeed(ray_session, tiny_dataset, tmp_path, fusion):
    """A 2-worker DeepSpeed run of each registered strategy with a decoder trained on captions and VQA, evaluated
    at step 1 (eval.every) and at the end: the held-out metrics are those the strategy provides."""
    summary = train(_cfg(tiny_dataset, tmp_path, f"model.fusion={fusion}", "model.decoder_depth=1",
                         "model.vqa_weight=1", "train.max_steps=2", "train.checkpoint_every=100", "eval.every=1",
                         "eval.max_new_tokens=4", "eval.max_samples=32"))
    assert summary["steps"] == 2 and summary["samples_seen"] == 2 * GLOBAL
    m = summary["metrics"]
    assert m["periodic_evals"] == 1 and m["val_eval_pairs"] == 32
    provides = FUSIONS[fusion].provides
    assert ("val_i2t_r@10" in m) == ("val_zero_shot_acc" in m) == ("image_embeds" in provides)
    assert ("val_itm_acc" in m) == ("itm_logits" in provides)
    assert m["val_caption_loss"] > 0
    assert m["val_vqa_questions"] == 32 and 0 <= m["val_vqa_acc_compositional"] <= 1
    assert 0 <= m["val_bleu4"] <= 1 and m["val_cider_d"] >= 0
