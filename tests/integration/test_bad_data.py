"""Bad samples in real shards: counted by reason (inspect and training), skipped per sample, fatal over the limit."""
from pathlib import Path

import pytest

from mmray import config
from mmray.data.inspect import inspect
from mmray.data.pipeline import BadDataError
from mmray.data.prepare import prepare_synthetic
from mmray.data.webdataset import build_tar, iter_tar_samples
from mmray.train.trainer import train

TRAIN, VAL, PER_SHARD = 300, 64, 100


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Three train shards: shard 1 has 2 corrupt images, 1 non-UTF-8 caption and 1 image without caption;
    shard 2 is truncated in the middle."""
    root = tmp_path_factory.mktemp("damaged") / "shapes"
    prepare_synthetic(str(root), samples=TRAIN + VAL, seed=11, val_samples=VAL, samples_per_shard=PER_SHARD)
    shard1 = root / "train" / "00001.tar"
    samples = list(iter_tar_samples(shard1.read_bytes()))
    members = []
    for i, sample in enumerate(samples):
        key = sample["__key__"]
        jpg = b"\xff\xd8 not a jpeg" if i in (3, 7) else sample["jpg"]
        txt = b"caf\xe9 \xff" if i == 10 else sample["txt"]
        members.append((f"{key}.jpg", jpg))
        if i != 20:
            members.append((f"{key}.txt", txt))
        members.append((f"{key}.json", sample["json"]))
    shard1.write_bytes(build_tar(members))
    shard2 = root / "train" / "00002.tar"
    data = shard2.read_bytes()
    shard2.write_bytes(data[: len(data) // 2])
    return root, [s["__key__"] for s in samples]


def test_inspect_counts_every_bad_sample_by_reason(ray_session, damaged):
    root, keys = damaged
    summary = inspect(str(root / "train"))
    bad = summary["bad"]
    assert bad["corrupt_image"] == 2 and bad["non_utf8_caption"] == 1 and bad["missing_caption"] == 1
    assert summary["shards"] == 3
    assert summary["expected_samples"] == TRAIN  # from the shards' _stats.json
    assert summary["bytes"] == sum(p.stat().st_size for p in (root / "train").glob("*.tar"))
    intact = PER_SHARD + (PER_SHARD - 4)
    assert intact + 40 < summary["samples"] < intact + 60  # about half of the truncated shard survives
    # The rest of it is counted, a bad sample each (its _stats.json says how many it held): every sample of the
    # data set is usable or counted bad.
    assert 40 < bad["truncated_shard"] < 60 and summary["samples"] + sum(bad.values()) == TRAIN
    assert summary["bad_examples"]["truncated_shard"] == [f"{root}/train/00002.tar:{root}/train/00002.tar#truncated"]
    assert any(keys[3] in example for example in summary["bad_examples"]["corrupt_image"])
    assert summary["samples_per_s"] > 0


def _cfg(root, tmp_path, *overrides):
    return config.load(None, [
        f"data.source={root}", "data.image_size=32", "data.max_text_len=24", "data.shuffle_buffer=0",
        "model.image_depth=1", "model.text_depth=1", "model.image_width=32", "model.text_width=32",
        "model.embed_dim=16", "model.image_heads=2", "model.text_heads=2", "train.micro_batch_size=16",
        "train.max_steps=6", "train.warmup_steps=1", "train.log_every=3", "train.checkpoint_every=100",
        "train.max_failures=0", "eval.max_samples=32", f"run.storage_path={tmp_path}", *overrides])


def test_training_skips_and_reports_bad_samples(ray_session, damaged, tmp_path):
    root, _ = damaged
    summary = train(_cfg(root, tmp_path, "data.max_bad_fraction=0.5"))
    assert summary["steps"] == 6
    bad = summary["data_quality"]["bad"]
    # the cut shard's lost samples, each one (training counts them from the shards' _stats.json as inspect does)
    assert bad["corrupt_image"] >= 2 and bad["truncated_shard"] > 1
    assert summary["metrics"]["val_eval_pairs"] == 32


def test_training_stops_with_a_clear_error_over_the_limit(ray_session, damaged, tmp_path):
    root, _ = damaged
    with pytest.raises(BadDataError, match=r"over data.max_bad_fraction=0.001.*corrupt_image.*raise "
                                           r"data\.max_bad_fraction and run the same command again: the run continues"):
        train(_cfg(root, tmp_path, "data.max_bad_fraction=0.001"))


def test_inspect_counts_each_row_of_an_unreadable_parquet_row_group(ray_session, damaged, tmp_path):
    """Through Ray Data as through the reader alone: a Parquet shard whose third row group cannot be read (its image
    column's page header overwritten) gives the other groups' samples, and each row of that group counted bad."""
    import pyarrow as pa

    from tests.unit.test_reader import _parquet_with_a_bad_row_group

    root, _ = damaged
    samples = list(iter_tar_samples((root / "train" / "00000.tar").read_bytes()))
    table = pa.table({"key": [s["__key__"] for s in samples], "jpg": [s["jpg"] for s in samples],
                      "txt": [s["txt"].decode() for s in samples]})
    shard = tmp_path / "00000.parquet"
    shard.write_bytes(_parquet_with_a_bad_row_group(table, 25, 2))
    summary = inspect(str(shard))
    assert (summary["samples"], summary["bad"]) == (PER_SHARD - 25, {"unreadable_row_group": 25})
    assert summary["bad_examples"] == {"unreadable_row_group": [f"{shard}:{shard}#rowgroup2"]}
