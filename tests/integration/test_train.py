"""Training under Ray Train with real DeepSpeed engines (gloo on CPU): ZeRO stages, checkpoints, resume, S3, and the
ZeRO-3 export."""
import json
from pathlib import Path

import boto3
import pytest
from mmray import config
from mmray.data.prepare import prepare_synthetic
from mmray.export import export
from mmray.models.fusion import FUSIONS
from mmray.train.engine import load_checkpoint_file
from mmray.train.trainer import train

from export_check import assert_export_matches, reference_state
from tiny_config import GLOBAL, WORKERS, tiny_cfg


def _cfg(data, storage, *overrides):
    return tiny_cfg(data, storage, *overrides)


def _files(checkpoint: str) -> set[str]:
    root = Path(checkpoint)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_rerun_resumes_from_latest_checkpoint_on_s3(ray_session, s3_bucket):
    """Data and checkpoints in S3 (moto over HTTP): a rerun with more steps resumes from the checkpoint in S3, and a
    rerun of a finished run trains nothing."""
    data = f"s3://{s3_bucket}/datasets/shapes"
    prepare_synthetic(data, samples=400, seed=5, val_samples=64, samples_per_shard=200)
    runs = f"s3://{s3_bucket}/runs"
    first = train(_cfg(data, runs, "run.name=resume", "budget.meter_interval_s=3600"))
    assert first["steps"] == 4 and first["metrics"]["resumed_from_step"] == 0
    assert first["samples_seen"] == 4 * GLOBAL and first["run_dir"] == f"{runs}/resume"
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/resume/")["Contents"]}
    prefix = "runs/resume/checkpoint_00000004/"
    for name in ("state.json", "config.yaml", "tokenizer.json", "ds/mp_rank_00_model_states.pt",
                 "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        assert prefix + name in keys
    assert json.loads(s3.get_object(Bucket=s3_bucket, Key=prefix + "state.json")["Body"].read())["step"] == 4
    # The cost meter saved the spend at each checkpoint (steps 2 and 4), not only at its start and stop (its own
    # samples are an hour apart here): a driver killed after a checkpoint loses no spend from before it.
    cost = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/resume/cost.json")["Body"].read())
    assert len(cost["series"]) >= 4, cost["series"]

    # What a driver killed while uploading a checkpoint leaves: part of a checkpoint that Ray Train never registered
    # (it never deletes those). The rerun resumes from step 4, and removes it once its own checkpoints are kept.
    s3.put_object(Bucket=s3_bucket, Key="runs/resume/checkpoint_00000003/ds/mp_rank_00_model_states.pt", Body=b"x")

    longer = train(_cfg(data, runs, "run.name=resume", "train.max_steps=6"))
    assert longer["metrics"]["resumed_from_step"] == 4
    left = {o["Key"].split("/")[2] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/resume/")["Contents"]}
    assert {n for n in left if n.startswith("checkpoint_0")} == {"checkpoint_00000004", "checkpoint_00000006"}
    assert longer["steps"] == 6
    assert longer["samples_seen"] == 6 * GLOBAL
    assert longer["checkpoint"].endswith("checkpoint_00000006")

    # Running a finished run again trains nothing, re-evaluates, and reports the same model's figures.
    again = train(_cfg(data, runs, "run.name=resume", "train.max_steps=6"))
    assert again["metrics"]["resumed_from_step"] == 6 and again["steps"] == 6
    assert again["checkpoint"].endswith("checkpoint_00000006_eval1")
    for key in ("val_i2t_r@1", "val_t2i_r@5"):
        assert again["metrics"][key] == pytest.approx(longer["metrics"][key])


# Two strategies through Ray Train, at the ZeRO stages the other runs of the suite do not train at (they default to
# ZeRO-1; test_checkpoint.py's run is ZeRO-2 without DeepSpeed's options, test_exact_resume.py's ZeRO-0), with
# DeepSpeed's options on, and between them both kinds of held-out metrics: retrieval from a contrastive strategy,
# image-text matching from a fusing one. Gradient accumulation feeds DeepSpeed's batch arithmetic.
# Every strategy against ZeRO-0's losses under ZeRO-3, and every combination of stage and options, train in
# tests/integration/test_deepspeed_options.py (cheaper: no Ray); the sweeps train every strategy through Ray Train.
FUSION_RUNS = [  # (fusion, ZeRO stage, gradient accumulation, DeepSpeed options)
    ("attention", 3, 1, ["train.offload_optimizer=cpu", "train.offload_param=cpu"]),
    ("late", 2, 2, ["train.offload_optimizer=cpu", "train.activation_checkpointing=true"]),
]


def test_the_runs_cover_both_kinds_of_held_out_metrics():
    provides = [FUSIONS[r[0]].provides for r in FUSION_RUNS]
    assert any("image_embeds" in p for p in provides) and any("itm_logits" in p for p in provides)


@pytest.mark.parametrize("fusion, stage, accum, deepspeed", FUSION_RUNS, ids=[r[0] for r in FUSION_RUNS])
def test_fusion_strategies_train_under_deepspeed(ray_session, tiny_dataset, tmp_path, fusion, stage, accum,
                                                 deepspeed):
    """A 2-worker DeepSpeed run of a strategy with a decoder trained on captions and VQA, evaluated
    at the end (the ZeRO-3 run also at step 1, eval.every, between training steps): the held-out metrics are those
    the strategy provides (ZeRO-3 generates with its partitioned parameters gathered). The final checkpoint holds
    every rank's shards, the state, the data position and the config, and loads with weights_only=True."""
    cfg = _cfg(tiny_dataset, tmp_path, f"model.fusion={fusion}", "model.decoder_depth=1", "model.vqa_weight=1",
               "train.max_steps=2", "train.checkpoint_every=100", f"eval.every={int(stage == 3)}",
               "eval.max_new_tokens=4", "eval.max_samples=32", f"train.zero_stage={stage}", f"train.grad_accum={accum}", *deepspeed)
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["samples_seen"] == 2 * GLOBAL * accum
    m = summary["metrics"]
    assert m["periodic_evals"] == (stage == 3) and m["val_eval_pairs"] == 32
    provides = FUSIONS[fusion].provides
    assert ("val_i2t_r@10" in m) == ("val_zero_shot_acc" in m) == ("image_embeds" in provides)
    assert ("val_itm_acc" in m) == ("itm_logits" in provides)
    assert m["val_caption_loss"] > 0
    assert m["val_vqa_questions"] == 32 and 0 <= m["val_vqa_acc_compositional"] <= 1
    assert 0 <= m["val_bleu4"] <= 1 and m["val_cider_d"] >= 0

    assert summary["checkpoint"].endswith("checkpoint_00000002")
    files = _files(summary["checkpoint"])
    # Every rank's optimizer shard is in the one merged checkpoint; ZeRO-3 also shards the parameters.
    for rank in range(WORKERS):
        assert (f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files) == (stage > 0)
        assert (f"ds/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in files) == (stage == 3)
    assert {"state.json", "config.yaml", "tokenizer.json"} <= files
    state = json.loads((Path(summary["checkpoint"]) / "state.json").read_text())
    assert state == {"step": 2, "samples_seen": 2 * GLOBAL * accum, "samples_repeated": 0, "epoch": state["epoch"],
                     "emergency_checkpoints": 0, "preemptions": [], "world_size": WORKERS}
    # The data position: every rank's trained-on samples of the epoch, in the checkpoint, none twice.
    from mmray.data.position import read_consumed

    consumed = read_consumed(summary["checkpoint"])
    assert state["epoch"] == 0 and consumed.num_rows == 2 * GLOBAL * accum
    assert len(set(zip(*consumed.to_pydict().values()))) == consumed.num_rows
    assert summary["samples_repeated"] == 0
    assert config.load(Path(summary["checkpoint"]) / "config.yaml") == cfg
    for name in files:
        if name.endswith(".pt"):
            load_checkpoint_file(str(Path(summary["checkpoint"]) / name))
    if stage == 3:  # `mmray export` gathers ZeRO-3's partitioned parameters bit for bit (ZeRO-2: test_checkpoint.py)
        assert export(summary["checkpoint"], str(tmp_path / "export"))["step"] == 2
        assert_export_matches(tmp_path / "export", reference_state(Path(summary["checkpoint"])))
