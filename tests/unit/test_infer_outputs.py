"""Batch inference plumbing without Ray: end-of-shard tallies, out-of-order assembly, resumable outputs, search."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mmray.config import ConfigError
from mmray.data.reader import RAW_SCHEMA, iter_tar
from mmray.data.tokenizer import TextTokenizer, train_tokenizer
from mmray.data.webdataset import build_tar, encode_jpeg
from mmray.infer.inputs import END_OF_SHARD, Decode, find_sources
from mmray.infer.outputs import OutputDir, ShardAssembler, float_lists
from mmray.infer.search import _top, search_vector

CAPTIONS = ["a red circle", "a blue square", "a green cross", "a red square", "a blue circle"]


def _tar(n: int, corrupt: set[int] = frozenset()) -> bytes:
    members = []
    for i in range(n):
        jpg = b"not an image" if i in corrupt else encode_jpeg(Image.new("RGB", (16, 16), (i * 40, 0, 0)))
        members += [(f"{i:04d}.jpg", jpg), (f"{i:04d}.txt", CAPTIONS[i % len(CAPTIONS)].encode())]
    return build_tar(members)


def _raw(shard: str, data: bytes, with_end: bool = True) -> dict[str, np.ndarray]:
    table = pa.concat_tables([RAW_SCHEMA.empty_table(), *iter_tar(io.BytesIO(data), shard, 100)])
    cols = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in RAW_SCHEMA.names}
    if with_end:
        end = {"key": "", "shard": shard, "error": f"{END_OF_SHARD}:{table.num_rows}"}
        cols = {k: np.append(v, np.array([end.get(k)], dtype=object)) for k, v in cols.items()}
    return cols


@pytest.fixture(scope="module")
def decode():
    tok = TextTokenizer(train_tokenizer(CAPTIONS, 128))
    return Decode(tok.to_str(), 8, 6)


def _cat(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_decode_drops_bad_samples_and_tallies_every_raw_row(decode):
    raw = _cat(_raw("s1", _tar(4, corrupt={1})), _raw("s2", _tar(3), with_end=False))
    out = decode(raw)
    tally = out["tally"]
    assert list(out["key"][~tally]) == ["0000", "0002", "0003", "0000", "0001", "0002"]
    assert out["image"].shape == (8, 8, 8, 3) and out["text_ids"].shape == (8, 6)
    assert {(s, n, t) for s, n, t in zip(out["shard"][tally], out["n_raw"][tally], out["n_total"][tally])} == \
        {("s1", 4, 4), ("s2", 3, -1)}


def test_assembler_completes_a_shard_once_its_rows_add_up_in_any_order(decode):
    first = _raw("s1", _tar(5, corrupt={0}))
    parts = [{k: v[:3] for k, v in first.items()}, {k: v[3:] for k, v in first.items()}]
    b1, b2 = decode(parts[0]), decode(parts[1])     # b2 holds the end-of-shard row
    assembler = ShardAssembler(["s1", "s2"])
    assert assembler.add(b2) == []                   # total known, rows missing
    (shard, rows, total), = assembler.add(b1)
    assert (shard, total, sorted(rows["key"])) == ("s1", 5, ["0001", "0002", "0003", "0004"])
    assert "tally" not in rows and assembler.pending() == ["s2"]
    (shard, rows, total), = assembler.add(decode(_raw("s2", build_tar([]))))  # an empty shard completes too
    assert (shard, rows, total) == ("s2", {}, 0)


def _table(keys: list[str]) -> pa.Table:
    return pa.table({"key": keys, "caption": ["c"] * len(keys),
                     "image_embedding": float_lists(np.eye(len(keys), 3, dtype=np.float32)),
                     "text_embedding": float_lists(np.eye(len(keys), 3, dtype=np.float32)),
                     "shard": ["x"] * len(keys)})


def test_output_dir_resumes_by_source_and_never_overwrites_another_sources_output(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    assert out.plan([("/d/a.tar", "a.tar")]) == ([("/d/a.tar", "a.tar")], 0)
    record = out.write("a.tar", "/d/a.tar", _table(["1", "2"]), raw_rows=3)
    assert (record["rows"], record["bad"], record["file"]) == (2, 1, "a.tar.parquet")
    todo, skipped = out.plan([("/d/a.tar", "sub__a.tar"), ("/e/a.tar", "a.tar")])
    assert skipped == 1 and todo[0][0] == "/e/a.tar" and todo[0][1].startswith("a.tar-")
    (tmp_path / "out" / "a.tar.parquet").write_bytes(b"truncated")          # not the recorded size: redo
    assert out.plan([("/d/a.tar", "a.tar")]) == ([("/d/a.tar", "a.tar")], 0)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_output_dir_refuses_to_mix_two_exports(tmp_path):
    out = OutputDir(str(tmp_path / "out"), "jsonl")
    out.claim({"kind": "embeddings", "weights_sha256": "aaa", "export": "/x"}, same=("kind", "weights_sha256"))
    out.claim({"kind": "embeddings", "weights_sha256": "aaa", "export": "/moved"}, same=("kind", "weights_sha256"))
    assert out.manifest()["export"] == "/moved"
    with pytest.raises(ConfigError, match="weights_sha256"):
        out.claim({"kind": "embeddings", "weights_sha256": "bbb"}, same=("kind", "weights_sha256"))
    with pytest.raises(ConfigError, match="allowed values: parquet, jsonl"):
        OutputDir(str(tmp_path), "csv")
    out.write("a.tar", "/d/a.tar", _table(["1"]).select(["key", "caption"]), raw_rows=1)
    assert json.loads((tmp_path / "out" / "a.tar.jsonl").read_text()) == {"key": "1", "caption": "c"}


def test_find_sources_names_outputs_after_their_place_in_src(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "ds" / split).mkdir(parents=True)
        (tmp_path / "ds" / split / "00000.tar").write_bytes(_tar(1))
    names = [name for _, name in find_sources([str(tmp_path / "ds")])]
    assert names == ["train__00000.tar", "val__00000.tar"]
    assert find_sources([str(tmp_path / "ds" / "val" / "00000.tar")])[0][1] == "00000.tar"
    from mmray.storage import StorageError
    with pytest.raises(StorageError, match="both be written"):
        find_sources([str(tmp_path / "ds" / "train"), str(tmp_path / "ds" / "val")])


def test_top_k_keeps_one_row_per_caption_when_asked():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert _top(scores, ["a", "a", "b", "c"], 2, unique_captions=False) == [0, 1]
    assert _top(scores, ["a", "a", "b", "c"], 2, unique_captions=True) == [0, 2]


def test_search_vector_merges_top_k_across_files(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    out.write("a", "/a", _table(["1", "2"]), 2)
    out.write("b", "/b", _table(["3"]), 1)
    hits = search_vector(str(tmp_path / "out"), np.array([0.0, 1.0, 0.0]), "image_embedding", k=2)
    assert hits[0]["key"] == "2" and hits[0]["score"] == pytest.approx(1.0)
    assert len(hits) == 2 and hits[1]["score"] == pytest.approx(0.0)


def test_decode_gives_each_sample_its_origin(decode):
    """A staged folder's sample names its original file (metadata ``source``), an img2dataset one its URL."""
    jpg = encode_jpeg(Image.new("RGB", (16, 16), (200, 0, 0)))
    metas = [{"source": "/photos/cat.jpg"}, {"url": "https://example.com/dog.jpg", "caption": "x"}, {}, None]
    members = []
    for i, meta in enumerate(metas):
        members += [(f"{i:04d}.jpg", jpg), (f"{i:04d}.txt", CAPTIONS[i].encode())]
        if meta is not None:
            members.append((f"{i:04d}.json", json.dumps(meta).encode()))
    out = decode(_raw("s", build_tar(members)))
    assert list(out["source"][~out["tally"]]) == ["/photos/cat.jpg", "https://example.com/dog.jpg", "", ""]


def test_a_directory_holding_shards_and_images_is_refused(tmp_path):
    """Reading only its shards would leave the images out without a word."""
    from mmray.infer.inputs import check_sources

    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "00000.tar").write_bytes(_tar(1))
    (tmp_path / "mixed" / "photo.JPG").write_bytes(encode_jpeg(Image.new("RGB", (8, 8))))
    with pytest.raises(ConfigError, match=r"mixed holds both shards and 1 image file\(s\) \(e.g. .*photo.JPG\)"):
        check_sources([str(tmp_path / "mixed")], str(tmp_path / "out"))
    (tmp_path / "mixed" / "photo.JPG").unlink()
    (tmp_path / "mixed" / "._photo.jpg").write_bytes(b"macOS resource fork")  # hidden: not an image to read
    check_sources([str(tmp_path / "mixed")], str(tmp_path / "out"))
    # A listing refused for what it holds is not taken for a folder of images (which would end in "no images").
    (tmp_path / "mixed" / "00000.tar.gz").write_bytes(b"the same shard again")
    with pytest.raises(ValueError, match="00000.tar and .*00000.tar.gz are one shard under two names"):
        check_sources([str(tmp_path / "mixed")], str(tmp_path / "out"))


def test_contact_sheet_shows_images_as_the_model_sees_them(tmp_path):
    """A 16-bit greyscale PNG at half scale is mid-grey on the sheet (Pillow's RGB conversion would clip it white)."""
    from mmray.infer.search import CELL, render_contact_sheet

    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24), 32768, np.uint16)).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    shard = tmp_path / "00000.tar"
    shard.write_bytes(build_tar([("0000.png", buf.getvalue()), ("0000.txt", b"grey")]))
    hits = [{"key": "0000", "shard": str(shard), "caption": "grey", "score": 0.5, "source": ""}]
    sheet = Image.open(io.BytesIO(render_contact_sheet(hits, "query"))).convert("RGB")
    assert sheet.getpixel((CELL // 2, 24 + CELL // 2)) == (128, 128, 128)


@pytest.mark.parametrize("out", ["/data/out", "s3://bucket/out"])
def test_samples_staging_left_out_count_in_proportion_to_what_a_run_reads(out):
    """A folder's unreadable images count as its staged shards are read: not all at the first shard (0.5% bad would
    look like 30%), and in a rerun only for the part it reads."""
    from mmray.infer.inputs import LeftOut

    dest = f"{out}/_staged/abc"
    staged = {dest: {"bad": {"corrupt_image": 6, "missing_caption": 1}, "bad_examples": {"corrupt_image": ["x.jpg"],
                                                                                          "missing_caption": ["y.jpg"]},
                     "samples": 1200}}
    shards = [f"{dest}/train/0000{i}.tar" for i in range(3)] + [f"{out}/other/00000.tar"]
    left_out = LeftOut(staged, shards)
    assert left_out.counts() == {"bad": {}, "bad_examples": {}}
    left_out.add(shards[3], 500)  # not a staged source's shard
    left_out.add(shards[0], 400)
    assert left_out.counts() == {"bad": {"corrupt_image": 2}, "bad_examples": {"corrupt_image": ["x.jpg"]}}
    left_out.add(shards[1], 400)
    left_out.add(shards[2], 400)
    assert left_out.counts()["bad"] == {"corrupt_image": 6, "missing_caption": 1}
    # A rerun that finds two of the three outputs written reads the last third.
    rerun = LeftOut(staged, shards[2:3])
    rerun.add(shards[2], 400)
    assert rerun.counts()["bad"] == {"corrupt_image": 2}
