"""prepare_synthetic on local disk: layout, exact counts, disjoint splits, reproducible bytes."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from mmray.data.prepare import default_val_samples, is_prepared, parse_source, prepare_synthetic
from mmray.data.tokenizer import TextTokenizer
from mmray.data.webdataset import iter_tar_samples

ARGS = dict(samples=50, seed=3, val_samples=10, samples_per_shard=16)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    dest = tmp_path_factory.mktemp("data") / "shapes"
    messages: list[str] = []
    summary = prepare_synthetic(str(dest), progress=messages.append, **ARGS)
    return dest, summary, messages


def _read_split(split_dir) -> list[dict]:
    tars = sorted(p for p in os.listdir(split_dir) if p.endswith(".tar"))
    return [s for t in tars for s in iter_tar_samples((split_dir / t).read_bytes())]


def test_layout_and_summary(prepared):
    dest, summary, _ = prepared
    assert sorted(os.listdir(dest)) == ["dataset.json", "tokenizer.json", "train", "val"]
    assert sorted(os.listdir(dest / "train")) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar", "00002_stats.json"]
    assert sorted(os.listdir(dest / "val")) == ["00000.tar", "00000_stats.json"]
    assert {k: v for k, v in summary.items() if k != "wall_s"} == {
        "dest": str(dest), "train_samples": 40, "val_samples": 10, "train_shards": 3, "val_shards": 1,
        "tokenizer": str(dest / "tokenizer.json")}
    manifest = json.loads((dest / "dataset.json").read_text())
    files = {split: manifest[split].pop("files") for split in ("train", "val")}
    assert manifest == {
        "name": "synthetic:shapes", "format": "webdataset", "seed": 3, "image_size": 64, "samples_per_shard": 16,
        "train": {"samples": 40, "shards": 3}, "val": {"samples": 10, "shards": 1}, "tokenizer": "tokenizer.json"}
    assert [(f["path"], f["samples"]) for f in files["train"]] == [
        ("train/00000.tar", 16), ("train/00001.tar", 16), ("train/00002.tar", 8)]
    assert [(f["path"], f["samples"]) for f in files["val"]] == [("val/00000.tar", 10)]
    for f in files["train"] + files["val"]:
        assert f["sha256"] == hashlib.sha256((dest / f["path"]).read_bytes()).hexdigest()
    assert is_prepared(str(dest)) and not is_prepared(str(dest / "train"))


def test_counts_in_stats_and_in_tars(prepared):
    dest, _, _ = prepared
    counts = [json.loads((dest / "train" / f"{i:05d}_stats.json").read_text())["count"] for i in range(3)]
    assert counts == [16, 16, 8]
    assert json.loads((dest / "val" / "00000_stats.json").read_text())["successes"] == 10
    train, val = _read_split(dest / "train"), _read_split(dest / "val")
    assert len(train) == 40 and len(val) == 10
    assert all(set(s) == {"__key__", "jpg", "txt", "json"} for s in train + val)
    assert [s["__key__"] for s in train[15:18]] == ["000000015", "000010000", "000010001"]


def test_splits_are_disjoint_consecutive_indices(prepared):
    dest, _, _ = prepared
    train = [json.loads(s["json"]) for s in _read_split(dest / "train")]
    val = [json.loads(s["json"]) for s in _read_split(dest / "val")]
    assert [m["index"] for m in train] == list(range(40))
    assert [m["index"] for m in val] == list(range(40, 50))
    assert {m["seed"] for m in train + val} == {3}
    assert all(m["qa"] and m["objects"] for m in train + val)


def test_progress_reports_every_shard(prepared):
    _, _, messages = prepared
    shard_lines = [m for m in messages if "shard" in m]
    assert shard_lines == ["train: shard 1/3 written (16/40 samples)", "train: shard 2/3 written (32/40 samples)",
                           "train: shard 3/3 written (40/40 samples)", "val: shard 1/1 written (10/10 samples)"]


def test_tokenizer_covers_validation_text(prepared):
    dest, _, _ = prepared
    tok = TextTokenizer.from_file(str(dest / "tokenizer.json"))
    val = [json.loads(s["json"]) for s in _read_split(dest / "val")]
    texts = [m["caption"] for m in val] + [qa["question"] for m in val for qa in m["qa"]]
    ids = tok.encode_batch(texts, max_len=32)
    assert not (ids == tok.tokenizer.token_to_id("[UNK]")).any()
    assert [tok.decode(row) for row in ids] == texts


def test_same_seed_gives_byte_identical_data(prepared, tmp_path):
    dest, _, _ = prepared
    prepare_synthetic(str(tmp_path), **ARGS)
    for rel in ("train/00000.tar", "train/00002.tar", "val/00000.tar", "tokenizer.json", "dataset.json"):
        assert (tmp_path / rel).read_bytes() == (dest / rel).read_bytes(), rel


def test_other_seed_gives_other_images(prepared, tmp_path):
    dest, _, _ = prepared
    prepare_synthetic(str(tmp_path), **{**ARGS, "seed": 4})
    assert (tmp_path / "val/00000.tar").read_bytes() != (dest / "val/00000.tar").read_bytes()


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path):
    prepare_synthetic(str(tmp_path), samples=40, val_samples=8, samples_per_shard=8)
    assert len(os.listdir(tmp_path / "train")) == 8
    (tmp_path / "train" / "00001.tar.gz").write_bytes(b"a compressed copy, which would be read as a shard too")
    summary = prepare_synthetic(str(tmp_path), samples=20, val_samples=0, samples_per_shard=8)
    assert summary["train_shards"] == 3 and summary["val_shards"] == 0
    assert sorted(os.listdir(tmp_path / "train")) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar", "00002_stats.json"]
    assert os.listdir(tmp_path / "val") == []
    assert json.loads((tmp_path / "dataset.json").read_text())["val"] == {"samples": 0, "shards": 0, "files": []}


def test_default_validation_hold_out():
    assert default_val_samples(100_000) == 10_000
    assert default_val_samples(1_000) == 256
    assert default_val_samples(300) == 150
    assert default_val_samples(1) == 0


@pytest.mark.parametrize("kwargs, word", [
    ({"samples": 0}, "samples"),
    ({"samples": 10, "val_samples": 10}, "val_samples"),
    ({"samples": 10, "samples_per_shard": 0}, "samples_per_shard"),
    ({"samples": 10, "image_size": 8}, "image_size"),
    ({"samples": 10, "vocab_size": 8}, "vocab_size"),
])
def test_bad_arguments_are_rejected_before_writing(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        prepare_synthetic(str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_parse_source():
    assert parse_source("synthetic:shapes") == "synthetic:shapes"
    with pytest.raises(ValueError, match="synthetic:shapes"):
        parse_source("laion:400m")
