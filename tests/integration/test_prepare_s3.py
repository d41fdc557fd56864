"""Storage and prepare_synthetic against a real S3 endpoint over HTTP (moto's server)."""
from __future__ import annotations

import hashlib
import json

import boto3
import pytest

from mmray import storage
from mmray.data.prepare import is_prepared, prepare_synthetic
from mmray.data.tokenizer import TextTokenizer
from mmray.data.webdataset import iter_tar_samples
from mmray.storage import StorageError

ARGS = dict(samples=30, seed=11, val_samples=6, samples_per_shard=10)


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3")  # endpoint and credentials from the environment, the standard way
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed.get("Contents", [])}


def test_prepare_to_s3_matches_local_prepare(s3_bucket, tmp_path):
    dest = f"s3://{s3_bucket}/datasets/shapes"
    summary = prepare_synthetic(dest, **ARGS)
    assert summary["train_shards"] == 3 and summary["val_shards"] == 1
    assert summary["tokenizer"] == f"{dest}/tokenizer.json"

    objects = _objects(s3_bucket, "datasets/shapes/")
    names = sorted(k.removeprefix("datasets/shapes/") for k in objects)
    assert names == ["dataset.json", "tokenizer.json",
                     "train/00000.tar", "train/00000_stats.json", "train/00001.tar", "train/00001_stats.json",
                     "train/00002.tar", "train/00002_stats.json", "val/00000.tar", "val/00000_stats.json"]
    manifest = json.loads(objects["datasets/shapes/dataset.json"])
    assert (manifest["train"]["samples"], manifest["train"]["shards"]) == (24, 3)
    assert (manifest["val"]["samples"], manifest["val"]["shards"]) == (6, 1)
    for entry in manifest["train"]["files"] + manifest["val"]["files"]:
        assert entry["sha256"] == hashlib.sha256(objects[f"datasets/shapes/{entry['path']}"]).hexdigest()
    assert [f["samples"] for f in manifest["train"]["files"]] == [10, 10, 4]
    counts = [len(list(iter_tar_samples(objects[f"datasets/shapes/train/0000{i}.tar"]))) for i in range(3)]
    assert counts == [10, 10, 4]
    assert json.loads(objects["datasets/shapes/val/00000_stats.json"])["count"] == 6

    prepare_synthetic(str(tmp_path), **ARGS)
    for name in names:
        if name.endswith((".tar", "tokenizer.json", "dataset.json")):
            assert objects[f"datasets/shapes/{name}"] == (tmp_path / name).read_bytes(), name

    assert is_prepared(dest) and not is_prepared(f"s3://{s3_bucket}/elsewhere")
    assert storage.list_files(f"{dest}/train", suffix=".tar") == [f"{dest}/train/0000{i}.tar" for i in range(3)]
    tok = TextTokenizer.from_file(f"{dest}/tokenizer.json")
    assert tok.to_str() == TextTokenizer.from_file(str(tmp_path / "tokenizer.json")).to_str()


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        prepare_synthetic("s3://no-such-bucket/data", samples=4, val_samples=1)
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.read_bytes("s3://no-such-bucket/x.json")
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.list_files("s3://no-such-bucket/prefix")


def test_s3_round_trip_and_missing_key(s3_bucket):
    uri = f"s3://{s3_bucket}/dir/file.txt"
    assert not storage.exists(uri)
    storage.write_text(uri, "hello s3")
    assert storage.exists(uri) and storage.exists(f"s3://{s3_bucket}/dir")
    assert storage.read_text(uri) == "hello s3"
    assert storage.list_files(f"s3://{s3_bucket}/dir/") == [uri]
    with pytest.raises(StorageError, match="other.txt"):
        storage.read_bytes(f"s3://{s3_bucket}/dir/other.txt")
    with pytest.raises(StorageError, match="nodir"):
        storage.list_files(f"s3://{s3_bucket}/nodir")
    storage.delete(uri)
    assert not storage.exists(uri)


def test_files_named_like_compressed_ones_are_stored_and_read_as_given(s3_bucket, s3_endpoint, tmp_path):
    """Arrow compresses and decompresses by file suffix unless told not to: a `.tar.gz` written through
    mmray.storage must hold the bytes given (what any other S3 client reads back), locally and on S3."""
    import gzip

    data = gzip.compress(b"a tar's bytes" * 100)
    for uri in (f"s3://{s3_bucket}/shards/00000.tar.gz", str(tmp_path / "00000.tar.gz")):
        storage.write_bytes(uri, data)
        assert storage.read_bytes(uri) == data
    obj = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=s3_bucket, Key="shards/00000.tar.gz")
    assert obj["Body"].read() == data
    assert (tmp_path / "00000.tar.gz").read_bytes() == data


def test_endpoint_precedence(s3_bucket, s3_endpoint, monkeypatch):
    """AWS_ENDPOINT_URL_S3 beats AWS_ENDPOINT_URL (as in boto3); an explicit endpoint_url beats both."""
    dead = "http://127.0.0.1:9"  # nothing listens there
    uri = f"s3://{s3_bucket}/precedence.txt"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    storage.write_text(uri, "via AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    assert storage.read_text(uri, endpoint_url=s3_endpoint) == "via AWS_ENDPOINT_URL_S3"
