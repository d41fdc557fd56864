"""run.keep_best: the best checkpoints by a reported metric are kept as verified copies in RUN_DIR/best/, ranked in
best.json, whatever Ray Train's keep_last deletes; the config refuses a metric that would never be reported."""
import json
import math
import os
import shutil

import pyarrow.fs as pafs
import pytest

from mmray import config
from mmray.train.checkpoint import (BEST_DIR, BEST_INDEX, STATE_FILE, BestPolicy, IncompleteCheckpoint, keep_best,
                                    read_best_index, select_best, verify, write_manifest)

FS = pafs.LocalFileSystem()
LOSS_MIN = BestPolicy(keep=2, metric="loss", mode="min")


def _checkpoint(run_dir, step: int, suffix: str = "") -> str:
    """A real (tiny) checkpoint directory: a shard, the loop state and rank 0's manifest."""
    name = f"checkpoint_{step:08d}{suffix}"
    d = run_dir / name
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1000 + step))
    (d / STATE_FILE).write_text(json.dumps({"step": step, "world_size": 1}))
    write_manifest(str(d), 0, 1, step)
    return name


def _best(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / BEST_DIR).iterdir() if p.is_dir())


def test_select_best_orders_by_mode_newer_wins_ties_and_skips_nan():
    scores = {"checkpoint_00000002": 0.5, "checkpoint_00000004": 0.3, "checkpoint_00000006": 0.5,
              "checkpoint_00000008": math.nan, "checkpoint_00000004_r1": 0.3}
    assert select_best(scores, 3, "min") == ["checkpoint_00000004_r1", "checkpoint_00000004", "checkpoint_00000006"]
    assert select_best(scores, 2, "max") == ["checkpoint_00000006", "checkpoint_00000002"]
    assert select_best(scores, 9, "min")[-1] == "checkpoint_00000002"  # NaN never ranks
    assert len(select_best(scores, 9, "min")) == 4


def test_best_copies_survive_keep_last_and_displaced_ones_go(tmp_path):
    run_dir = tmp_path / "run"
    losses = {2: 0.9, 4: 0.5, 6: 0.7, 8: 0.4}
    kept = []
    for step, loss in losses.items():
        name = _checkpoint(run_dir, step)
        kept = keep_best(str(run_dir), FS, name, loss, LOSS_MIN, log=lambda _: None)
        for old in sorted(p.name for p in run_dir.glob("checkpoint_*"))[:-1]:  # Ray Train's keep_last=1
            shutil.rmtree(run_dir / old)
    assert kept == ["checkpoint_00000008", "checkpoint_00000004"]
    assert _best(run_dir) == ["checkpoint_00000004", "checkpoint_00000008"]  # 2 was displaced, 6 never copied
    assert not (run_dir / "checkpoint_00000004").exists()  # Ray deleted the original: the copy is what is left
    index = read_best_index(str(run_dir), FS)
    assert index == {"metric": "loss", "mode": "min",
                     "scores": {"checkpoint_00000004": 0.5, "checkpoint_00000008": 0.4}}
    assert verify(str(run_dir / BEST_DIR / "checkpoint_00000004"))["step"] == 4  # complete, digests included
    assert (run_dir / BEST_DIR / "checkpoint_00000008" / "ds" / "mp_rank_00_model_states.pt").read_bytes() == \
        (run_dir / "checkpoint_00000008" / "ds" / "mp_rank_00_model_states.pt").read_bytes()


def test_an_unranked_copy_is_removed_and_a_new_metric_starts_over(tmp_path):
    run_dir = tmp_path / "run"
    keep_best(str(run_dir), FS, _checkpoint(run_dir, 2), 0.5, LOSS_MIN, log=lambda _: None)
    (run_dir / BEST_DIR / "checkpoint_00000004").mkdir()  # a copy whose writer was killed before ranking it
    keep_best(str(run_dir), FS, _checkpoint(run_dir, 6), 0.9, LOSS_MIN, log=lambda _: None)
    assert _best(run_dir) == ["checkpoint_00000002", "checkpoint_00000006"]

    lines = []
    recall = BestPolicy(keep=1, metric="val_i2t_r@1", mode="max")
    assert keep_best(str(run_dir), FS, _checkpoint(run_dir, 8), 0.25, recall, log=lines.append) == \
        ["checkpoint_00000008"]
    assert _best(run_dir) == ["checkpoint_00000008"]
    assert "ranked by loss (min); ranking by val_i2t_r@1 (max) from now on" in lines[0]


def test_a_copy_missing_a_file_is_never_ranked(tmp_path):
    run_dir = tmp_path / "run"
    name = _checkpoint(run_dir, 2)
    (run_dir / name / "ds" / "mp_rank_00_model_states.pt").unlink()  # what the manifest lists is not all there
    with pytest.raises(IncompleteCheckpoint, match="mp_rank_00_model_states.pt is missing"):
        keep_best(str(run_dir), FS, name, 0.5, LOSS_MIN, log=lambda _: None)
    assert not (run_dir / BEST_DIR / BEST_INDEX).exists()


def test_score_names_the_metrics_an_evaluation_reports():
    policy = BestPolicy(keep=1, metric="val_itm_acc", mode="max")
    assert policy.score({"loss": 1.0, "val_itm_acc": 0.75}, "c") == 0.75
    assert policy.score({"step": 3, "loss": 1.0}, "c") is None  # a checkpoint between evaluations
    with pytest.raises(config.ConfigError, match=r"'val_itm_acc' is not reported.*checkpoint c carries "
                                                 r"val_i2t_r@1, val_zero_shot_acc"):
        policy.score({"val_zero_shot_acc": 0.5, "val_i2t_r@1": 0.25}, "c")


@pytest.mark.parametrize("overrides, error", [
    (["run.keep_best_metric=accuracy"], "run.keep_best_metric: 'accuracy' is not a metric reported"),
    (["train.log_every=3", "train.checkpoint_every=4"], "make train.checkpoint_every a multiple of train.log_every"),
    (["run.keep_best_metric=val_i2t_r@1"], "set eval.every to a divisor of train.checkpoint_every"),
    (["run.keep_best_metric=val_i2t_r1"], "'val_i2t_r1' is not a held-out metric the evaluation reports. Did you "
                                          "mean 'val_i2t_r@1'?"),
    (["run.keep_best_metric=val_i2t_r@1", "eval.every=30", "train.checkpoint_every=100"], "eval.every=30"),
    (["run.keep_best_mode=lowest"], "allowed values: 'min', 'max'"),
])
def test_config_refuses_a_metric_that_checkpoints_would_not_carry(overrides, error):
    with pytest.raises(config.ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        config.load(None, ["run.keep_best=2", *overrides])


def test_config_accepts_reported_metrics():
    assert config.load(None, ["run.keep_best=2"]).run.keep_best_metric == "loss"
    cfg = config.load(None, ["run.keep_best=1", "run.keep_best_metric=val_i2t_r@1", "run.keep_best_mode=max",
                             "eval.every=50", "train.checkpoint_every=100"])
    assert BestPolicy.from_config(cfg.run) == BestPolicy(1, "val_i2t_r@1", "max")
    assert BestPolicy.from_config(config.load(None, ["run.keep_best_metric=nonsense"]).run) is None  # off: unchecked
