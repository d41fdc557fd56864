"""Shards read the way the config says, wherever shards are read: WebDataset member extensions from the config
(data.image_extensions, data.caption_extension, data.metadata_extension) through the real Ray Data reader,
training's datasource, `mmray data inspect`, `mmray eval` and `mmray embed`; and `mmray eval --data` in
data.source's forms (prefix, brace pattern, '::' list, local and S3), with missing shards named.

The model is a random-weight tiny export (as in test_infer.py): what is checked is which samples reach it.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmray import config, storage
from mmray.data.pipeline import read_raw, read_split, reader_options
from mmray.data.position import DataPosition
from mmray.data.tokenizer import TextTokenizer, train_tokenizer
from mmray.data.webdataset import build_tar
from mmray.eval.run import run_eval
from tests.img2dataset_layout import write_img2dataset
from tests.integration.test_infer import mmray, random_export

SAMPLES = 6
MEMBER_KEYS = ["data.image_extensions=image.png", "data.caption_extension=caption",
               "data.metadata_extension=meta.json"]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(i).rand(12, 12, 3) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    """One tar whose samples are KEY.image.png, KEY.caption and KEY.meta.json, plus a KEY.txt that is not the
    caption: the default keys find no image in it."""
    root = tmp_path_factory.mktemp("renamed")
    members = []
    for i in range(SAMPLES):
        key = f"s{i:03d}"
        members += [(f"{key}.image.png", _png(i)), (f"{key}.caption", f"a picture numbered {i}".encode()),
                    (f"{key}.meta.json", json.dumps({"label": f"l{i % 2}"}).encode()),
                    (f"{key}.txt", b"not the caption")]
    (root / "00000.tar").write_bytes(build_tar(members))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    """Knows both data sets' captions."""
    texts = [f"a picture numbered {i}" for i in range(SAMPLES)] + [f"photo 0 {i}" for i in range(100)]
    return TextTokenizer(train_tokenizer(texts, vocab_size=128))


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer):
    """A tiny random late-fusion export that reads WebDataset members with MEMBER_KEYS."""
    root = tmp_path_factory.mktemp("export")
    return random_export(str(root / "late"), tokenizer, *MEMBER_KEYS)


def test_member_extensions_from_the_config_through_ray_data(ray_session, renamed, tokenizer):
    paths = [str(renamed / "00000.tar")]
    rows = read_raw(paths, **reader_options(config.load(None, MEMBER_KEYS))).take_all()
    assert sorted(r["key"] for r in rows) == [f"s{i:03d}" for i in range(SAMPLES)]
    for r in rows:
        i = int(r["key"][1:])
        assert r["error"] == "" and r["image"] == _png(i)
        assert r["caption"] == f"a picture numbered {i}".encode()
        assert json.loads(r["meta"]) == {"label": f"l{i % 2}"}
    defaults = read_raw(paths, **reader_options(config.load(None, []))).take_all()
    assert [r["error"] for r in defaults] == ["missing_image"] * SAMPLES

    # Training's datasource (positioned, for exact resume) and decode path, with the same keys.
    cfg = config.load(None, [*MEMBER_KEYS, "data.image_size=16"])
    position = ray_session.remote(DataPosition).remote()
    rows = read_split(paths, cfg, tokenizer, shuffle_seed=0, position=position).take_all()
    assert sorted((r["key"], r["caption"], r["label"]) for r in rows) == [
        (f"s{i:03d}", f"a picture numbered {i}", f"l{i % 2}") for i in range(SAMPLES)]


def test_inspect_eval_and_embed_read_with_the_member_keys(ray_session, renamed, export, tmp_path):
    code, summary = mmray("data", "inspect", str(renamed), *MEMBER_KEYS, "--image-size", "16")
    assert code == 0 and (summary["samples"], summary["bad"]) == (SAMPLES, {})
    code, summary = mmray("data", "inspect", str(renamed), "--image-size", "16")
    # The default keys find no image (see the test above): every sample is counted bad, none lost on the way.
    assert code == 0 and (summary["samples"], summary["bad"]) == (0, {"missing_image": SAMPLES})
    code, summary = mmray("data", "inspect", str(renamed), "model.fusion=early")
    assert code == 2 and "only the data-reading keys" in summary["error"]

    # The export was trained with these keys: eval and embed read its data with them, with no override.
    metrics = run_eval(export, str(renamed), max_samples=0, overrides=["eval.generate=false"])["metrics"]
    assert metrics["eval_pairs"] == SAMPLES
    code, summary = mmray("embed", export, str(renamed), str(tmp_path / "emb"), "--actors", "1")
    assert code == 0 and (summary["samples"], summary["bad"]) == (SAMPLES, {}), summary
    (written,) = storage.list_files(str(tmp_path / "emb"), ".parquet")
    table = pq.read_table(written, columns=["key", "caption"]).to_pylist()
    assert sorted((r["key"], r["caption"]) for r in table) == [(f"s{i:03d}", f"a picture numbered {i}")
                                                               for i in range(SAMPLES)]


def test_embed_and_generate_take_the_data_reading_keys_as_overrides(ray_session, renamed, tokenizer, tmp_path):
    """An export trained on default members reads data laid out otherwise with --set; other keys are refused."""
    plain = random_export(str(tmp_path / "plain"), tokenizer)
    sets = [arg for key in MEMBER_KEYS for arg in ("--set", key)]
    code, summary = mmray("embed", plain, str(renamed), str(tmp_path / "emb"), "--actors", "1", *sets)
    assert code == 0 and (summary["samples"], summary["bad"]) == (SAMPLES, {}), summary
    (written,) = storage.list_files(str(tmp_path / "emb"), ".parquet")
    assert sorted(pq.read_table(written, columns=["key"]).column("key").to_pylist()) == [
        f"s{i:03d}" for i in range(SAMPLES)]
    for command in ("embed", "generate"):
        code, summary = mmray(command, plain, str(renamed), str(tmp_path / f"bad-{command}"),
                              "--set", "data.caption_extension=caption", "--set", "model.fusion=early")
        assert code == 2 and "only the data-reading keys" in summary["error"] and "model.fusion=early" in \
            summary["error"], summary
        assert not os.path.exists(tmp_path / f"bad-{command}")  # refused before OUT was claimed


def test_eval_data_takes_the_forms_of_data_source(ray_session, export, tmp_path, s3_bucket):
    """A prefix (img2dataset's layout, metadata Parquet beside each tar), a brace pattern and a '::' list of the
    same shards, locally and on S3, give the same metrics; a missing shard is named, unless allowed."""
    root = str(tmp_path / "laion")
    write_img2dataset(root, shards=3, urls_per_shard=5, failed_every=4)  # 4 samples a shard
    write_img2dataset(f"s3://{s3_bucket}/laion", shards=3, urls_per_shard=5, failed_every=4)  # the same shards
    jpeg_keys = ["data.image_extensions=jpg", "data.caption_extension=txt", "data.metadata_extension=json"]

    def evaluate(src: str, *extra: str) -> dict:
        return run_eval(export, src, max_samples=0, overrides=["eval.generate=false", *jpeg_keys, *extra])

    by_prefix = evaluate(root)
    assert by_prefix["shards"] == 3 and by_prefix["metrics"]["eval_pairs"] == 12 and by_prefix["bad"] == {}
    with pytest.raises(storage.StorageError, match=f"shard does not exist: {root}/00003.tar"):
        evaluate(f"{root}/{{00000..00003}}.tar")
    s3 = f"s3://{s3_bucket}/laion"
    for src, extra in ((f"{root}/{{00000..00003}}.tar", ["data.allow_missing_shards=true"]),
                       (f"{root}/00000.tar::{root}/{{00001,00002}}.tar", []),
                       (f"{s3}/{{00000..00001}}.tar::{s3}/00002.tar", [])):
        summary = evaluate(src, *extra)
        assert summary["shards"] == 3 and summary["metrics"] == by_prefix["metrics"], src
    with pytest.raises(config.ConfigError, match="--data: .*named by more than one part"):
        evaluate(f"{root}/00000.tar::{root}/{{00000,00001}}.tar")
    with pytest.raises(config.ConfigError, match="--data: .*empty part"):
        evaluate(f"{root}::")
    with pytest.raises(config.ConfigError, match="only eval.\\* keys"):
        evaluate(root, "model.fusion=early")


def test_inspect_names_a_parquet_caption_column_that_holds_no_text(ray_session, tmp_path):
    """A Parquet shard whose `txt` column holds numbers (and captions in a list column, Flickr30k-style): inspect
    stops with exit 2 and the message names the shard, the column and its type, not a Ray traceback; pointed at
    the list column, every sample reads with its first caption."""
    import pyarrow as pa

    path = tmp_path / "00000.parquet"
    pq.write_table(pa.table({"jpg": [_png(i) for i in range(SAMPLES)], "txt": list(range(SAMPLES)),
                             "sentences": [[f"picture {i}", "another"] for i in range(SAMPLES)]}), path)
    code, summary = mmray("data", "inspect", str(tmp_path), "--image-size", "16")
    assert code == 2 and summary == {
        "error": f"{path}: Parquet caption column 'txt' holds int64, not text (a string, binary, or a list of "
                 "strings); set data.caption_column to the column with the captions.", "kind": "bad_input"}
    code, summary = mmray("data", "inspect", str(tmp_path), "data.caption_column=sentences", "--image-size", "16")
    assert code == 0 and (summary["samples"], summary["bad"]) == (SAMPLES, {})


def test_compressed_tars_on_s3_read_by_inspect_and_training_exactly(ray_session, tokenizer, tmp_path, s3_bucket):
    """img2dataset's layout on S3 with its tars compressed three ways (gzip as `gzip`/webdataset write it, .tgz,
    zstd), each beside its metadata Parquet and _stats.json: inspect and training's datasource read exactly the
    samples, counted by the stats; a .tar.gz cut short on its way to storage keeps the samples before the cut and is
    counted as a truncated shard."""
    import gzip

    import pyarrow as pa

    local = str(tmp_path / "laion")
    written = write_img2dataset(local, shards=3, urls_per_shard=40, failed_every=5)  # 32 samples a shard
    keys = sorted(k for ks in written.values() for k in ks)
    zstd = pa.BufferOutputStream()
    with pa.CompressedOutputStream(zstd, "zstd") as out:
        out.write((tmp_path / "laion" / "00002.tar").read_bytes())
    prefix = f"s3://{s3_bucket}/laion"
    blobs = {"00000.tar.gz": gzip.compress((tmp_path / "laion" / "00000.tar").read_bytes()),
             "00001.tgz": gzip.compress((tmp_path / "laion" / "00001.tar").read_bytes()),
             "00002.tar.zst": zstd.getvalue().to_pybytes()}
    for i in range(3):
        for name in (f"0000{i}.parquet", f"0000{i}_stats.json"):
            blobs[name] = (tmp_path / "laion" / name).read_bytes()
    for name, data in blobs.items():
        storage.write_bytes(f"{prefix}/{name}", data)

    code, summary = mmray("data", "inspect", prefix + "/", "--image-size", "16")
    assert code == 0, summary
    assert (summary["samples"], summary["expected_samples"], summary["bad"], summary["shards"]) == (96, 96, {}, 3)
    shards = [f"{prefix}/00000.tar.gz", f"{prefix}/00001.tgz", f"{prefix}/00002.tar.zst"]
    cfg = config.load(None, ["data.image_size=16"])
    position = ray_session.remote(DataPosition).remote()
    rows = read_split(shards, cfg, tokenizer, shuffle_seed=0, position=position).take_all()
    assert sorted(r["key"] for r in rows) == keys
    assert all(r["caption"] == f"photo 0 {r['key']}" for r in rows)

    storage.write_bytes(f"{prefix}/cut/00000.tar.gz", blobs["00000.tar.gz"][:len(blobs["00000.tar.gz"]) // 2])
    code, summary = mmray("data", "inspect", f"{prefix}/cut/", "--image-size", "16")
    assert code == 0 and summary["bad"] == {"truncated_shard": 1}, summary  # how many it lost is not known
    assert 0 < summary["samples"] < 32
    storage.write_bytes(f"{prefix}/cut/00000_stats.json", blobs["00000_stats.json"])
    code, summary = mmray("data", "inspect", f"{prefix}/cut/", "--image-size", "16")
    assert code == 0 and summary["samples"] + summary["bad"]["truncated_shard"] == summary["expected_samples"] == 32
    cut = f"{s3_bucket}/laion/cut/00000.tar.gz"  # as the reader names an S3 shard: its filesystem path
    assert summary["bad_examples"]["truncated_shard"] == [f"{cut}:{cut}#truncated"]
