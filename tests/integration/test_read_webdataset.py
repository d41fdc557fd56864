"""Ray Data's read_webdataset reads prepared shards, from local disk and from S3 through mmray.storage."""
from __future__ import annotations

import os

import numpy as np
import pytest

from mmray import storage
from mmray.data.prepare import prepare_synthetic

ARGS = dict(samples=45, seed=5, val_samples=5, samples_per_shard=16)
COLUMNS = {"__key__", "__url__", "jpg", "txt", "json"}


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    dest = tmp_path_factory.mktemp("wds") / "shapes"
    prepare_synthetic(str(dest), **ARGS)
    return dest


def _check_rows(rows: list[dict], expected: int) -> None:
    assert len(rows) == expected
    assert all(set(r) == COLUMNS for r in rows)
    assert sorted(r["json"]["index"] for r in rows) == list(range(expected))
    for r in rows:
        assert isinstance(r["jpg"], np.ndarray) and r["jpg"].shape == (64, 64, 3) and r["jpg"].dtype == np.uint8
        assert r["txt"] == r["json"]["caption"] and r["__key__"] == r["json"]["key"]


def test_read_webdataset_local(ray_session, local_data):
    # The _stats.json files beside the tars (as img2dataset writes them) must be excluded by extension.
    ds = ray_session.data.read_webdataset(str(local_data / "train"), file_extensions=["tar"])
    _check_rows(ds.take_all(), expected=40)


def test_read_webdataset_s3_with_storage_filesystem(s3_bucket, ray_session):
    dest = f"s3://{s3_bucket}/shapes"
    prepare_synthetic(dest, **ARGS)
    fs, train_dir = storage.resolve(f"{dest}/train")
    # Ray workers may have started before the test endpoint existed; real clusters get these from the node.
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    ds = ray_session.data.read_webdataset(train_dir, filesystem=fs, file_extensions=["tar"],
                                          runtime_env={"env_vars": env})
    _check_rows(ds.take_all(), expected=40)
