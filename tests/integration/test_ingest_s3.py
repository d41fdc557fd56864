"""`prepare_ingest` from a folder and from a CSV index on S3 to S3, against a real S3 endpoint (moto's server)."""
from __future__ import annotations

import hashlib
import io
import json

import boto3
import numpy as np
import pytest
from PIL import Image

from mmray.data.ingest import prepare_ingest
from mmray.data.prepare import is_prepared
from mmray.data.webdataset import iter_tar_samples


def _image(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(i).rand(16, 16, 3) * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"].removeprefix(prefix): client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed.get("Contents", [])}


def test_prepare_from_an_s3_folder_and_index_to_s3(s3_bucket):
    client = boto3.client("s3")  # endpoint and credentials from the environment, the standard way
    sources = {}
    for i in range(6):
        ext, fmt = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))[i % 3]
        key = f"raw/{'x' if i < 3 else 'y/z'}/{i}.{ext}"
        sources[key] = _image(i, fmt)
        client.put_object(Bucket=s3_bucket, Key=key, Body=sources[key])
        client.put_object(Bucket=s3_bucket, Key=key.rsplit(".", 1)[0] + ".txt", Body=f"image {i}".encode())
    client.put_object(Bucket=s3_bucket, Key="raw/x/nocaption.png", Body=_image(9, "PNG"))

    src, dest = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/prepared/photos"
    with pytest.raises(ValueError, match="inside SRC"):
        prepare_ingest(src, f"{src}/out")
    for missing in (f"s3://{s3_bucket}/nothing", "s3://no-such-bucket/raw", f"s3://{s3_bucket}/raw/none.csv"):
        with pytest.raises(ValueError, match=f"does not exist: {missing}"):
            prepare_ingest(missing, dest)
    summary = prepare_ingest(src, dest, samples_per_shard=4, val_samples=1, seed=2)
    assert (summary["train_samples"], summary["val_samples"], summary["train_shards"]) == (5, 1, 2)
    assert summary["bad"] == {"missing_caption": 1}
    assert summary["bad_examples"] == {"missing_caption": [f"{src}/x/nocaption.png"]}
    assert is_prepared(dest)

    objects = _objects(client, s3_bucket, "prepared/photos/")
    assert sorted(objects) == ["dataset.json", "tokenizer.json", "train/00000.tar", "train/00000_stats.json",
                               "train/00001.tar", "train/00001_stats.json", "val/00000.tar", "val/00000_stats.json"]
    manifest = json.loads(objects["dataset.json"])
    for entry in manifest["train"]["files"] + manifest["val"]["files"]:
        assert entry["sha256"] == hashlib.sha256(objects[entry["path"]]).hexdigest()
    samples = [s for name in ("train/00000.tar", "train/00001.tar", "val/00000.tar")
               for s in iter_tar_samples(objects[name])]
    assert len(samples) == 6
    for s in samples:
        source = json.loads(s["json"])["source"]
        ext = source.rsplit(".", 1)[-1]
        assert s[ext] == sources[source.removeprefix(f"s3://{s3_bucket}/")]
        assert s["txt"] == f"image {source.rsplit('/', 1)[-1].split('.')[0]}".encode()

    # A CSV index on S3 with a relative and an s3:// image path.
    index = "path,caption\nx/0.jpg,first\n" + f"s3://{s3_bucket}/raw/y/z/4.png,second\nx/gone.jpg,third\n"
    client.put_object(Bucket=s3_bucket, Key="raw/index.csv", Body=index.encode())
    summary = prepare_ingest(f"{src}/index.csv", f"s3://{s3_bucket}/prepared/index", format="parquet",
                             val_samples=0)
    assert (summary["train_samples"], summary["bad"]) == (2, {"missing_image": 1})
    assert "train/00000.parquet" in _objects(client, s3_bucket, "prepared/index/")
