"""The `mmray` command as a user runs it: exit codes, the JSON summary line, and the messages a user sees."""
import json
import time
from pathlib import Path

import pytest

from mmray import config
from mmray.models.fusion import FUSIONS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args, needles", [
    (["train", "train.lrr=1"], ["unknown key train.lrr", "Did you mean 'train.lr'"]),
    (["train", "model.fusion=earley"], ["model.fusion", "allowed values: late"]),
    (["train", "--config", "missing.yaml"], ["config file not found: missing.yaml"]),
    (["train", "data.source=/nonexistent/shapes", "train.max_steps=2", "train.warmup_steps=1"],
     ["/nonexistent/shapes"]),
    (["eval", "model", "--data", "shards", "--max-samples", "-1"], ["--max-samples must be >= 0 (0: every sample)"]),
])
def test_bad_input_exits_2_before_ray_starts(mmray, args, needles):
    t0 = time.perf_counter()
    r = mmray(*args, timeout=120)
    assert r.code == 2, r.stderr
    assert r.summary["kind"] == "bad_input"
    for needle in needles:
        assert needle in r.summary["error"] and needle in r.stderr
    assert "Started a local Ray instance" not in r.stderr
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("args, error, usage", [
    (["train", "--bogus"], "mmray train: unrecognized arguments: --bogus", "usage: mmray train"),
    (["data", "prepare", "synthetic:shapes", "out", "--samples", "0"],  # 0 is not "the default"
     "mmray data prepare: argument --samples: must be at least 1, got 0", "usage: mmray data prepare"),
    (["data", "inspect", "shards", "--image-size", "-3"],
     "mmray data inspect: argument --image-size: must be at least 1, got -3", "usage: mmray data inspect"),
    (["model", "info", "tiny", "--vocab-size", "0"],
     "mmray model info: argument --vocab-size: must be at least 1, got 0", "usage: mmray model info"),
])
def test_usage_errors_exit_2_with_the_commands_usage_and_a_json_line(mmray, args, error, usage):
    r = mmray(*args, timeout=60)
    assert r.code == 2 and r.summary == {"error": error, "kind": "usage"}, r.stderr
    prog, message = error.split(": ", 1)
    assert f"{prog}: error: {message}" in r.stderr and usage in r.stderr


def test_config_command_documents_and_validates(mmray):
    r = mmray("config")
    assert r.code == 0
    assert r.summary["keys"] == config.all_keys()
    assert "train.lr" in r.summary["keys"] and "Peak learning rate" in r.stderr
    r = mmray("config", "--config", str(REPO / "jobs/configs/quickstart.yaml"), "train.lr=0.01")
    assert r.code == 0 and r.summary["valid"] and r.summary["config"]["train"]["lr"] == 0.01


@pytest.mark.parametrize("argv, verbose", [(["config"], False), (["-v", "config"], True), (["config", "-v"], True),
                                           (["data", "inspect", "shards", "--verbose"], True),
                                           (["sweep", "--resume", "-v"], True), (["-v", "embed", "m", "d", "o"], True)])
def test_verbose_before_or_after_the_subcommand(argv, verbose):
    from mmray import cli

    assert cli.build_parser().parse_args(argv).verbose is verbose


def test_model_list(mmray):
    r = mmray("model", "list")
    assert r.code == 0 and "tiny" in r.summary["presets"] and "ViT-L-14" in r.summary["presets"]
    assert r.summary["fusions"] == list(FUSIONS)


def test_data_prepare_synthetic(mmray, tmp_path):
    dest = tmp_path / "shapes"
    r = mmray("data", "prepare", "synthetic:shapes", str(dest), "--samples", "700", "--seed", "7",
              "--val-samples", "100", "--shard-size", "200")
    assert r.code == 0, r.stderr
    assert (r.summary["train_samples"], r.summary["val_samples"]) == (600, 100)
    assert sorted(p.name for p in (dest / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert (dest / "tokenizer.json").exists()
    assert json.loads((dest / "dataset.json").read_text())["seed"] == 7
    assert "shard" in r.stderr  # progress is reported


def test_data_prepare_rejects_unknown_source(mmray, tmp_path):
    r = mmray("data", "prepare", "synthetic:cats", str(tmp_path / "x"), "--samples", "10")
    assert r.code == 2 and "synthetic:shapes" in r.summary["error"]


def test_help_documents_every_command(mmray):
    for args in (["--help"], ["train", "--help"], ["data", "prepare", "--help"], ["config", "--help"]):
        r = mmray(*args)
        assert r.code == 0 and "usage: mmray" in r.stdout
    assert "resumes" in mmray("train", "--help").stdout
