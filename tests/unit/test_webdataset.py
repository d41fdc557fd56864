"""WebDataset shard writing in img2dataset's layout: names, keys, members, metadata, stats, reproducibility."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from mmray.data.reader import iter_parquet, iter_tar
from mmray.data.shapes import generate_sample
from mmray.data.webdataset import (
    ShardWriter, build_tar, iter_tar_samples, make_key, split_member_name,
)


def _write(dest: str, n: int, per_shard: int, seen: list | None = None) -> ShardWriter:
    with ShardWriter(dest, per_shard, on_shard=None if seen is None else seen.append) as writer:
        for i in range(n):
            s = generate_sample(1, i)
            writer.write(s.image, s.caption, {"index": i, "objects": s.objects})
    return writer


def test_keys_follow_img2dataset():
    assert make_key(1, 42, 1000) == "000010042"
    assert make_key(0, 0, 10000) == "000000000"
    assert make_key(123, 9999, 10000) == "001239999"
    assert make_key(2, 12345, 20000) == "0000212345"  # more than 10,000 per shard: the index grows a digit


def test_member_names_split_at_first_dot():
    assert split_member_name("000010042.jpg") == ("000010042", "jpg")
    assert split_member_name("dir/000010042.seg.json") == ("dir/000010042", "seg.json")


def test_shards_stats_and_members(tmp_path):
    seen = []
    writer = _write(str(tmp_path), n=5, per_shard=2, seen=seen)
    assert sorted(os.listdir(tmp_path)) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar", "00002_stats.json"]
    assert [(s.shard_id, s.count) for s in seen] == [(0, 2), (1, 2), (2, 1)] and writer.samples == 5
    assert seen[2].path == str(tmp_path / "00002.tar")
    for shard, count in ((0, 2), (1, 2), (2, 1)):
        stats = json.loads((tmp_path / f"{shard:05d}_stats.json").read_text())
        assert {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")} == {
            "count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}
        assert stats["status_dict"] == {"success": count}
        assert stats["end_time"] >= stats["start_time"] and stats["duration"] >= 0
    with tarfile.open(tmp_path / "00001.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 and m.isfile() for m in tar.getmembers())
    assert names == ["000010000.jpg", "000010000.txt", "000010000.json",
                     "000010001.jpg", "000010001.txt", "000010001.json"]
    assert (tmp_path / "00001.tar").read_bytes()[257:263] == b"ustar\x00"  # POSIX ustar magic


def test_sample_contents_and_metadata(tmp_path):
    _write(str(tmp_path), n=3, per_shard=10)
    samples = list(iter_tar_samples((tmp_path / "00000.tar").read_bytes()))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    for i, s in enumerate(samples):
        expected = generate_sample(1, i)
        meta = json.loads(s["json"])
        assert s["txt"].decode("utf-8") == expected.caption == meta["caption"]
        assert meta["sha256"] == hashlib.sha256(s["jpg"]).hexdigest()
        assert {k: meta[k] for k in ("key", "status", "error_message", "width", "height",
                                     "original_width", "original_height")} == {
            "key": s["__key__"], "status": "success", "error_message": None,
            "width": 64, "height": 64, "original_width": 64, "original_height": 64}
        assert meta["index"] == i and meta["objects"] == expected.objects
        image = Image.open(io.BytesIO(s["jpg"]))
        assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"


def test_identical_input_gives_identical_bytes(tmp_path):
    _write(str(tmp_path / "a"), n=4, per_shard=3)
    _write(str(tmp_path / "b"), n=4, per_shard=3)
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_no_shard_is_written_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), 10) as writer:
            s = generate_sample(0, 0)
            writer.write(s.image, s.caption)
            raise RuntimeError("generator broke")
    assert os.listdir(tmp_path) == []


def test_empty_writer_writes_nothing_and_bad_shard_size_is_rejected(tmp_path):
    with ShardWriter(str(tmp_path / "empty"), 10):
        pass
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match="samples_per_shard"):
        ShardWriter(str(tmp_path), 0)


def test_reader_rejects_samples_split_across_the_tar():
    data = build_tar([("k1.jpg", b"1"), ("k2.jpg", b"2"), ("k1.txt", b"t")])
    with pytest.raises(ValueError, match="k1"):
        list(iter_tar_samples(data))
    grouped = list(iter_tar_samples(build_tar([("k1.jpg", b"1"), ("k1.txt", b"t"), ("k2.jpg", b"2")])))
    assert grouped == [{"__key__": "k1", "jpg": b"1", "txt": b"t"}, {"__key__": "k2", "jpg": b"2"}]


def _png(size=(5, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_images_are_stored_as_they_are_with_their_extension(tmp_path):
    png = _png()
    seen = []
    with ShardWriter(str(tmp_path), 10, on_shard=seen.append) as writer:
        writer.write_encoded(png, ".PNG", "a png", 5, 3, {"source": "x.png"})
    (sample,) = iter_tar_samples((tmp_path / "00000.tar").read_bytes())
    assert sorted(sample) == ["__key__", "json", "png", "txt"] and sample["png"] == png
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"], meta["source"]) == (5, 3, "x.png")
    assert meta["sha256"] == hashlib.sha256(png).hexdigest()
    assert seen[0].sha256 == hashlib.sha256((tmp_path / "00000.tar").read_bytes()).hexdigest()
    with open(tmp_path / "00000.tar", "rb") as f:  # mmray's reader takes the .png member as the image
        (row,) = [r for block in iter_tar(f, "00000.tar", 8) for r in block.to_pylist()]
    assert (row["image"], row["caption"], row["error"]) == (png, b"a png", "")
    with pytest.raises(ValueError, match="extension"):
        writer.write_encoded(png, "", "no extension", 5, 3)


def test_parquet_shards_in_the_columns_the_reader_expects(tmp_path):
    png = _png()
    with ShardWriter(str(tmp_path), 2, format="parquet") as writer:
        for i in range(3):
            writer.write_encoded(png, "png", f"caption {i}", 5, 3, {"i": i})
    assert sorted(os.listdir(tmp_path)) == ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json"]
    assert [(s.count, s.size) for s in writer.shards] == [
        (2, os.path.getsize(tmp_path / "00000.parquet")), (1, os.path.getsize(tmp_path / "00001.parquet"))]
    rows = [r for block in iter_parquet((tmp_path / "00000.parquet").read_bytes(), "00000.parquet", 8,
                                        "jpg", "txt", "key") for r in block.to_pylist()]
    assert [(r["key"], r["image"], r["caption"], r["error"]) for r in rows] == [
        ("000000000", png, b"caption 0", ""), ("000000001", png, b"caption 1", "")]
    assert json.loads(rows[1]["meta"])["i"] == 1
    with pytest.raises(ValueError, match="format"):
        ShardWriter(str(tmp_path), 2, format="zip")
