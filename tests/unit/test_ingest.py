"""`mmray data prepare` from a folder of images with captions or a CSV / JSONL index, on local disk, with real files.

Reading the prepared sets back through Ray (mmray.data.inspect) is in tests/integration/test_ingest_read.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmray import cli
from mmray.data.ingest import prepare_ingest
from mmray.data.prepare import is_prepared, parse_source
from mmray.data.tokenizer import TextTokenizer, train_tokenizer
from mmray.data.webdataset import iter_tar_samples

SIZE = 16
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
ARGS = dict(samples_per_shard=4, val_samples=3, seed=5)


def image_bytes(i: int, fmt: str) -> bytes:
    pixels = (np.random.RandomState(i).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path) -> dict[str, str]:
    """10 good samples in nested folders (jpg, png, webp, jpeg, JPG; one caption file with a UTF-8 BOM), one image
    without a caption, one corrupt image with a caption, a GIF with a caption and a TIFF without (formats the shard
    readers do not take: counted, not ingested), and files to ignore. Returns {image path: caption} of the good
    samples."""
    good = {}
    dirs, exts = ["cats", "dogs", "dogs/puppies"], ["jpg", "png", "webp", "jpeg", "JPG"]
    for i in range(10):
        ext = exts[i % 5]
        path = root / dirs[i % 3] / f"{i:03d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(i, FORMATS[ext.lower()]))
        caption = f"photo {i}, of a {dirs[i % 3].split('/')[-1]}"
        bom = "\ufeff" if i == 4 else ""  # Notepad's UTF-8 starts with a byte-order mark: not caption text
        path.with_suffix(".txt").write_text(bom + caption + "\n", encoding="utf-8")
        good[str(path)] = caption
    (root / "cats" / "000.json").write_text(json.dumps({"label": "cat", "key": "not mine", "qa": []}))
    (root / "cats" / "nocap.png").write_bytes(image_bytes(98, "PNG"))
    jpg = image_bytes(99, "JPEG")
    (root / "dogs" / "broken.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "dogs" / "broken.txt").write_text("a broken dog")
    (root / "cats" / "anim.gif").write_bytes(image_bytes(97, "GIF"))
    (root / "cats" / "anim.txt").write_text("a moving cat")
    (root / "dogs" / "scan.TIF").write_bytes(image_bytes(96, "TIFF"))
    (root / "README.md").write_text("not data")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(jpg)
    return good


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("src") / "photos"
    return root, make_folder(root)


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    """The folder prepared as WebDataset and as Parquet: {format: (dest, summary, progress messages)}."""
    root, _ = folder
    out = {}
    for fmt in ("webdataset", "parquet"):
        dest = tmp_path_factory.mktemp("out") / fmt
        messages: list[str] = []
        summary = prepare_ingest(str(root), str(dest), format=fmt, progress=messages.append, **ARGS)
        out[fmt] = dest, summary, messages
    return out


def read_samples(dest: Path, split: str) -> list[dict]:
    """Every sample of a split as {key, ext, image, caption, meta}, tars or Parquet, in shard order."""
    samples = []
    for name in sorted(os.listdir(dest / split)):
        data = (dest / split / name).read_bytes()
        if name.endswith(".tar"):
            for s in iter_tar_samples(data):
                (ext,) = [e for e in s if e in FORMATS]
                samples.append({"key": s["__key__"], "ext": ext, "image": s[ext], "caption": s["txt"].decode(),
                                "meta": json.loads(s["json"])})
        elif name.endswith(".parquet"):
            for row in pq.read_table(dest / split / name).to_pylist():
                meta = json.loads(row["json"])
                samples.append({"key": row["key"], "ext": meta["source"].rsplit(".", 1)[-1].lower(),
                                "image": row["jpg"], "caption": row["txt"], "meta": meta})
    return samples


@pytest.mark.parametrize("fmt, suffix", [("webdataset", ".tar"), ("parquet", ".parquet")])
def test_layout_counts_and_manifest(prepared, folder, fmt, suffix):
    dest, summary, messages = prepared[fmt]
    root, _ = folder
    assert {k: v for k, v in summary.items() if k not in ("wall_s", "bad_examples")} == {
        "src": str(root), "dest": str(dest), "format": fmt, "train_samples": 7, "val_samples": 3,
        "train_shards": 2, "val_shards": 1,
        "bad": {"corrupt_image": 1, "missing_caption": 1, "unsupported_image_type": 2},
        "tokenizer": str(dest / "tokenizer.json")}
    assert summary["bad_examples"] == {"corrupt_image": [str(root / "dogs" / "broken.jpg")],
                                       "missing_caption": [str(root / "cats" / "nocap.png")],
                                       "unsupported_image_type": [str(root / "cats" / "anim.gif"),
                                                                  str(root / "dogs" / "scan.TIF")]}
    assert sorted(os.listdir(dest)) == ["dataset.json", "tokenizer.json", "train", "val"]
    assert sorted(os.listdir(dest / "train")) == [f"00000{suffix}", "00000_stats.json", f"00001{suffix}",
                                                  "00001_stats.json"]
    assert sorted(os.listdir(dest / "val")) == [f"00000{suffix}", "00000_stats.json"]
    manifest = json.loads((dest / "dataset.json").read_text())
    assert manifest["format"] == fmt and manifest["bad"] == summary["bad"]
    for split, samples, counts in (("train", 7, [4, 3]), ("val", 3, [3])):
        entry = manifest[split]
        assert (entry["samples"], entry["shards"]) == (samples, len(counts))
        assert [f["path"] for f in entry["files"]] == [f"{split}/{i:05d}{suffix}" for i in range(len(counts))]
        assert [f["samples"] for f in entry["files"]] == counts and sum(counts) == samples
        for f in entry["files"]:
            assert f["sha256"] == hashlib.sha256((dest / f["path"]).read_bytes()).hexdigest()
        assert [json.loads((dest / split / f"{i:05d}_stats.json").read_text())["count"]
                for i in range(len(counts))] == counts
        assert len(read_samples(dest, split)) == samples
    assert is_prepared(str(dest))
    assert [m for m in messages if "shard" in m][:2] == [
        "val: shard 1 written (3 samples, 3 in val so far)", "train: shard 1 written (4 samples, 4 in train so far)"]
    assert "done: 7 train + 3 val samples" in messages[-1]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_images_are_the_source_bytes_and_captions_round_trip(prepared, folder, fmt):
    dest, _, _ = prepared[fmt]
    _, good = folder
    train, val = read_samples(dest, "train"), read_samples(dest, "val")
    by_source = {s["meta"]["source"]: s for s in train + val}
    assert sorted(by_source) == sorted(good) and len(train + val) == len(good)  # disjoint splits, nothing lost
    for source, sample in by_source.items():
        assert sample["image"] == Path(source).read_bytes()
        assert sample["ext"] == source.rsplit(".", 1)[-1].lower()
        assert sample["caption"] == good[source] == sample["meta"]["caption"]
        assert sample["meta"]["sha256"] == hashlib.sha256(sample["image"]).hexdigest()
        assert (sample["meta"]["width"], sample["meta"]["height"]) == (SIZE, SIZE)
    assert [s["key"] for s in train] == ["000000000", "000000001", "000000002", "000000003",
                                         "000010000", "000010001", "000010002"]
    assert [s["meta"]["source"] for s in train] == sorted(s["meta"]["source"] for s in train)  # source order
    cat = by_source[str(folder[0] / "cats" / "000.jpg")]["meta"]
    assert cat["label"] == "cat" and cat["key"] != "not mine"  # the .json is kept; the writer's fields win ...
    assert cat["source_meta"] == {"key": "not mine"}  # ... and the source's own of those names are kept apart


def test_same_seed_same_bytes_other_seed_other_validation(prepared, folder, tmp_path):
    root, _ = folder
    dest, _, _ = prepared["webdataset"]
    prepare_ingest(str(root), str(tmp_path / "again"), **ARGS)
    for rel in ("train/00000.tar", "train/00001.tar", "val/00000.tar", "tokenizer.json", "dataset.json"):
        assert (tmp_path / "again" / rel).read_bytes() == (dest / rel).read_bytes(), rel
    prepare_ingest(str(root), str(tmp_path / "other"), **{**ARGS, "seed": 6})
    val = {s["meta"]["source"] for s in read_samples(dest, "val")}
    assert {s["meta"]["source"] for s in read_samples(tmp_path / "other", "val")} != val


def test_rewrite_in_the_other_format_leaves_no_stale_shards(folder, tmp_path):
    root, _ = folder
    prepare_ingest(str(root), str(tmp_path), samples_per_shard=2, val_samples=2)
    summary = prepare_ingest(str(root), str(tmp_path), format="parquet", samples_per_shard=8, val_samples=2)
    assert summary["train_shards"] == 1
    assert sorted(os.listdir(tmp_path / "train")) == ["00000.parquet", "00000_stats.json"]
    assert sorted(os.listdir(tmp_path / "val")) == ["00000.parquet", "00000_stats.json"]


def write_index_images(root: Path) -> list[bytes]:
    (root / "img").mkdir(parents=True)
    data = [image_bytes(i, "PNG") for i in range(4)]
    for i, d in enumerate(data):
        (root / "img" / f"{i}.png").write_bytes(d)
    return data


def test_csv_index_with_quoted_comma_and_newline_relative_and_absolute_paths(tmp_path):
    src = tmp_path / "src"
    data = write_index_images(src)
    (src / "index.csv").write_text(
        "path,text,source_id\n"
        'img/0.png,"a cat, sitting",a\n'
        'img/1.png,"two lines\nof caption",b\n'
        f"{src / 'img' / '2.png'},absolute path,c\n"
        "img/3.png,,d\n"
        "img/missing.png,gone,e\n"
        "img/0.gif,a gif,f\n"
        "img/download,saved without an extension,g\n"
        "img/notes,no extension and no image,h\n")
    (src / "img" / "download").write_bytes(data[1])  # a PNG, known by its signature
    (src / "img" / "notes").write_text("just text")
    summary = prepare_ingest(str(src / "index.csv"), str(tmp_path / "out"), val_samples=1, seed=1)
    assert (summary["train_samples"], summary["val_samples"]) == (3, 1)
    assert summary["bad"] == {"empty_caption": 1, "missing_image": 1, "unsupported_image_type": 2}
    assert summary["bad_examples"]["unsupported_image_type"][1] == f"{src / 'index.csv'}:10: img/notes"
    # Line numbers are the file's lines: the caption of the second row spans lines 3 and 4.
    assert summary["bad_examples"]["empty_caption"] == [f"{src / 'index.csv'}:6: img/3.png"]
    samples = read_samples(tmp_path / "out", "train") + read_samples(tmp_path / "out", "val")
    captions = {s["caption"]: s for s in samples}
    assert set(captions) == {"a cat, sitting", "two lines\nof caption", "absolute path", "saved without an extension"}
    assert captions["saved without an extension"]["image"] == data[1] and \
        captions["saved without an extension"]["ext"] == "png"
    assert captions["a cat, sitting"]["image"] == data[0] and captions["absolute path"]["image"] == data[2]
    assert captions["two lines\nof caption"]["meta"]["source_id"] == "b"  # other columns become metadata
    assert captions["a cat, sitting"]["meta"]["source"] == str(src / "img" / "0.png")


def test_jsonl_index(tmp_path):
    src = tmp_path / "src"
    data = write_index_images(src)
    lines = [{"image": f"img/{i}.png", "caption": f"picture {i}", "label": str(i),
              "qa": [{"question": "what number?", "answer": str(i)}]} for i in range(4)]
    (src / "index.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    summary = prepare_ingest(str(src / "index.jsonl"), str(tmp_path / "out"), format="parquet", val_samples=1)
    assert (summary["train_samples"], summary["val_samples"], summary["bad"]) == (3, 1, {})
    samples = read_samples(tmp_path / "out", "train") + read_samples(tmp_path / "out", "val")
    assert sorted((s["caption"], s["image"], s["meta"]["label"]) for s in samples) == [
        (f"picture {i}", data[i], str(i)) for i in range(4)]
    vocab = TextTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).tokenizer.get_vocab()
    assert "▁number" in vocab  # questions and answers in the metadata are tokenizer text too


@pytest.mark.parametrize("name, text, message", [
    ("index.csv", "file,caption\na.png,x\n",
     r"no image column: looked for 'image' or 'path' or 'filepath' or 'file_name'; it has \['file', 'caption'\]"),
    ("index.csv", "image,words\na.png,x\n", r"no caption column: looked for 'caption' or 'text'"),
    ("index.csv", "image,caption\na.png,x\nb.png,y,extra\n", r"index\.csv:3: malformed CSV row: 3 fields"),
    ("index.csv", 'image,caption\na.png,x\nb.png,"open quote\n', r"index\.csv:3: malformed CSV row"),
    ("index.csv", "", "is empty"),
    ("index.jsonl", '{"image": "a.png", "caption": "x"}\n{"image": "b.png", caption}\n',
     r"index\.jsonl:2: malformed JSON line"),
    ("index.jsonl", '{"image": "a.png", "caption": "x"}\n\n[1, 2]\n', r"index\.jsonl:3: .*expected an object"),
    ("index.jsonl", '{"img": "a.png", "caption": "x"}\n', r"index\.jsonl: no image column"),
    ("index.csv", "image,caption,image\na.png,x,b.png\n", r"index\.csv:1: the header names 'image' more than once"),
])
def test_bad_index_is_an_error_naming_file_line_or_columns(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        prepare_ingest(str(tmp_path / name), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_named_columns(tmp_path):
    src = tmp_path / "src"
    write_index_images(src)
    (src / "index.csv").write_text("file,words\n" + "".join(f"img/{i}.png,number {i}\n" for i in range(4)))
    summary = prepare_ingest(str(src / "index.csv"), str(tmp_path / "out"), image_column="file",
                             caption_column="words", val_samples=0)
    assert summary["train_samples"] == 4 and summary["val_samples"] == 0
    with pytest.raises(ValueError, match=r"no caption column 'caption_en' \(--caption-column\)"):
        prepare_ingest(str(src / "index.csv"), str(tmp_path / "out"), image_column="file", caption_column="caption_en")


def test_hugging_face_imagefolder_metadata_csv(tmp_path):
    """Hugging Face ImageFolder's `metadata.csv` names the image `file_name` (relative to the file) and the caption
    `text`: read as it is, with no column named."""
    src = tmp_path / "src"
    write_index_images(src)
    (src / "metadata.csv").write_text("file_name,text\n" + "".join(f"img/{i}.png,number {i}\n" for i in range(4)))
    summary = prepare_ingest(str(src / "metadata.csv"), str(tmp_path / "out"), val_samples=0)
    assert summary["train_samples"] == 4 and summary["bad"] == {}


def test_attached_tokenizer_is_copied(folder, tmp_path):
    root, _ = folder
    tok = tmp_path / "my_tokenizer.json"
    tok.write_text(train_tokenizer(["some other words entirely"], vocab_size=128).to_str())
    summary = prepare_ingest(str(root), str(tmp_path / "out"), tokenizer=str(tok), **ARGS)
    assert summary["tokenizer"] == str(tmp_path / "out" / "tokenizer.json")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tok.read_bytes()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json is not a valid tokenizer.json"):
        prepare_ingest(str(root), str(tmp_path / "out2"), tokenizer=str(tmp_path / "bad.json"))
    assert not (tmp_path / "out2").exists()


def test_bad_sources_are_errors_before_writing(folder, tmp_path):
    root, _ = folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "nocaptions").mkdir()
    (tmp_path / "nocaptions" / "a.png").write_bytes(image_bytes(0, "PNG"))
    (tmp_path / "shard.tar").write_bytes(b"")
    cases = [
        (str(tmp_path / "nothing"), "data source does not exist: .*nothing"),
        (str(tmp_path / "empty"), "no images .* found under .*empty"),
        (str(tmp_path / "nocaptions"), "no usable samples .*missing_caption"),
        (str(tmp_path / "shard.tar"), "not a .csv or .jsonl index"),
    ]
    for src, message in cases:
        with pytest.raises(ValueError, match=message):
            prepare_ingest(src, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="is inside SRC"):
        prepare_ingest(str(root), str(root / "prepared"))
    with pytest.raises(ValueError, match="val_samples=11 leaves no training sample: .* has 11 samples with captions"):
        prepare_ingest(str(root), str(tmp_path / "out"), val_samples=11)
    assert not (tmp_path / "out").exists() and not (root / "prepared").exists()
    # 11 images have captions but one of them is corrupt: found out only when read, so after validation is written.
    with pytest.raises(ValueError, match="no usable training samples .*corrupt_image: 1"):
        prepare_ingest(str(root), str(tmp_path / "late"), val_samples=10)
    assert not is_prepared(str(tmp_path / "late"))


def test_parse_source_routes_paths_and_names_the_problem(folder, tmp_path):
    root, _ = folder
    assert parse_source(str(root)) == str(root)
    assert parse_source("synthetic:shapes") == "synthetic:shapes"
    with pytest.raises(ValueError, match="unknown data source 'synthetic:cats'"):
        parse_source("synthetic:cats")
    with pytest.raises(ValueError, match=r"does not exist: .*nowhere.*synthetic:shapes.*\.csv / \.jsonl"):
        parse_source(str(tmp_path / "nowhere"))


def test_cli_prepares_a_folder_and_reports_bad_input(folder, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="mmray")
    root, _ = folder
    dest = tmp_path / "cli"
    code = cli.main(["data", "prepare", str(root), str(dest), "--format", "parquet", "--shard-size", "4",
                     "--val-samples", "2", "--seed", "1", "--vocab-size", "200"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["format"], summary["train_samples"], summary["val_samples"]) == ("parquet", 8, 2)
    assert summary["bad"] == {"corrupt_image": 1, "missing_caption": 1, "unsupported_image_type": 2}
    assert sorted(os.listdir(dest / "train")) == ["00000.parquet", "00000_stats.json", "00001.parquet",
                                                  "00001_stats.json"]
    assert "train: shard 2 written" in caplog.text

    for argv, message in [
        (["data", "prepare", str(tmp_path / "missing"), str(tmp_path / "x")], "data source does not exist"),
        (["data", "prepare", str(root), str(tmp_path / "x"), "--samples", "5"], "--samples applies only to"),
        (["data", "prepare", "synthetic:shapes", str(tmp_path / "x"), "--format", "parquet"], "--format applies only"),
    ]:
        code = cli.main(argv)
        out, _ = capsys.readouterr()
        summary = json.loads(out.strip().splitlines()[-1])
        assert code == 2 and summary["kind"] == "bad_input" and message in summary["error"], summary
    assert not (tmp_path / "x").exists()


def test_images_whose_names_differ_only_in_case_are_two_samples(tmp_path):
    """a.jpg and a.JPG (a case-sensitive file system holds both) are two images, each with the caption file whose
    extension has its case; neither is lost. b.PNG with only b.txt takes that."""
    src = tmp_path / "cased"
    src.mkdir()
    (src / "a.jpg").write_bytes(image_bytes(1, "JPEG"))
    (src / "a.JPG").write_bytes(image_bytes(2, "JPEG"))
    (src / "a.txt").write_text("first caption")
    (src / "a.TXT").write_text("second caption")
    (src / "b.PNG").write_bytes(image_bytes(3, "PNG"))
    (src / "b.txt").write_text("a third")
    summary = prepare_ingest(str(src), str(tmp_path / "out"), val_samples=0)
    assert (summary["train_samples"], summary["bad"]) == (3, {})
    samples = read_samples(tmp_path / "out", "train")
    assert sorted((s["meta"]["source"].rsplit("/", 1)[1], s["caption"]) for s in samples) == [
        ("a.JPG", "second caption"), ("a.jpg", "first caption"), ("b.PNG", "a third")]
    assert {s["image"] for s in samples} == {image_bytes(i, f) for i, f in ((1, "JPEG"), (2, "JPEG"), (3, "PNG"))}


def test_an_image_listed_with_several_captions_stays_in_one_split(tmp_path):
    """COCO-style: five captions per image, one row each. A held-out image must not also be trained on."""
    images = tmp_path / "imgs"
    images.mkdir()
    rows = ["image,caption"]
    for i in range(6):
        (images / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
        rows += [f"imgs/{i}.png,caption {c} of image {i}" for c in range(5)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    for seed in range(4):
        dest = tmp_path / f"out{seed}"
        summary = prepare_ingest(str(tmp_path / "captions.csv"), str(dest), val_samples=3, seed=seed)
        val = {s["meta"]["source"] for s in read_samples(dest, "val")}
        train = {s["meta"]["source"] for s in read_samples(dest, "train")}
        assert len(val) == 1 and not val & train and len(train) == 5
        assert (summary["val_samples"], summary["train_samples"]) == (5, 25)


def test_validation_that_takes_every_image_says_so(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = ["image,caption"]
    for i in range(2):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
        rows += [f"imgs/{i}.png,caption {c} of image {i}" for c in range(5)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"no usable training samples .*validation took 10 samples \(whole images, "
                                         r"with every row that lists them\): lower --val-samples"):
        prepare_ingest(str(tmp_path / "captions.csv"), str(tmp_path / "out"), val_samples=6)


def test_index_rows_as_other_writers_leave_them(tmp_path):
    """Rows as Spark / jq write JSON Lines (a null field left out), JPEGs under their other names (.jfif, a phone's
    MPO saved without an extension), a row naming a folder, `~/` and file:// paths, and fields that the writer sets
    itself: each row is a sample or a counted bad one, never captioned from another field and never a crash."""
    src = tmp_path / "src"
    data = write_index_images(src)
    jpeg = image_bytes(7, "JPEG")
    (src / "img" / "photo.jfif").write_bytes(jpeg)
    mpo = io.BytesIO()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(mpo, "MPO", save_all=True,
                                                               append_images=[Image.new("RGB", (SIZE, SIZE))])
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    (src / "img" / "camera").write_bytes(mpo.getvalue())
    (src / "img" / "folder").mkdir()
    home = tmp_path / "home"
    (home / "pics").mkdir(parents=True)
    (home / "pics" / "h.png").write_bytes(data[3])
    lines = [{"image": "img/0.png", "caption": "zero", "width": 999, "source": "laion"},
             {"image": "img/1.png", "text": "a watermark, not the caption"},  # no caption: counted
             {"caption": "no image field"},                                   # no image: counted
             {"image": "img/photo.jfif", "caption": "a jfif"},
             {"image": "img/camera", "caption": "an mpo"},
             {"image": "img/folder", "caption": "a folder"},                  # a directory: counted
             {"image": f"file://{src / 'img' / '2.png'}", "caption": "a file uri"},
             {"image": "~/pics/h.png", "caption": "in home"}]
    (src / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    import unittest.mock

    with unittest.mock.patch.dict(os.environ, {"HOME": str(home)}):
        summary = prepare_ingest(str(src / "index.jsonl"), str(tmp_path / "out"), val_samples=0)
    assert summary["bad"] == {"missing_caption": 1, "missing_image": 2}, summary
    assert summary["train_samples"] == 5
    samples = {s["caption"]: s for s in read_samples(tmp_path / "out", "train")}
    assert set(samples) == {"zero", "a jfif", "an mpo", "a file uri", "in home"}
    assert samples["a jfif"]["ext"] == "jpg" and samples["a jfif"]["image"] == jpeg
    assert samples["an mpo"]["ext"] == "jpg" and samples["an mpo"]["image"] == mpo.getvalue()
    assert samples["in home"]["image"] == data[3] and samples["a file uri"]["image"] == data[2]
    meta = samples["zero"]["meta"]
    assert meta["width"] == SIZE and meta["source_meta"] == {"width": 999, "source": "laion"}


def test_csv_with_a_caption_past_pythons_field_limit(tmp_path):
    src = tmp_path / "src"
    write_index_images(src)
    # spreadsheet exports: empty trailing header cells, a repeated column that is not read
    rows = "".join(f"img/{i}.png,n {i},a,b,,\n" for i in range(4))
    (src / "sheet.csv").write_text("image,caption,tag,tag,,\n" + rows)
    assert prepare_ingest(str(src / "sheet.csv"), str(tmp_path / "sheet"), val_samples=0)["train_samples"] == 4
    long = "word " * 40_000  # 200 KB: Python's csv refuses fields over 128 KiB unless told otherwise
    (src / "index.csv").write_text(f'image,caption\nimg/0.png,"{long}"\nimg/1.png,short\n')
    summary = prepare_ingest(str(src / "index.csv"), str(tmp_path / "out"), val_samples=0)
    assert summary["train_samples"] == 2 and summary["bad"] == {}


def test_folder_symlinks_list_each_image_once(tmp_path):
    """A symlinked folder is followed once: a second name for a folder (an alias) and a link back up the tree (a
    loop) add no sample, so no image lands in both splits; a dangling image link is a counted missing_image."""
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    for i in range(4):
        (root / "cats" / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
        (root / "cats" / f"{i}.txt").write_text(f"cat {i}")
    (root / "favourites").symlink_to(root / "cats")
    (root / "cats" / "loop").symlink_to(root)
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "gone.txt").write_text("a dangling link")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(image_bytes(9, "PNG"))
    (outside / "o.txt").write_text("linked in")
    (root / "more").symlink_to(outside)
    (root / ".cats_alias").symlink_to(root / "cats")  # a hidden second name hides nothing
    (root / "cats" / "5.png").write_bytes(image_bytes(5, "PNG"))
    (root / "cats" / "5.txt").symlink_to(root / "cats" / "5.txt")  # a link loop: unreadable, counted
    (root / "cats" / "6.png").symlink_to(root / "cats" / "6.png")
    (root / "cats" / "6.txt").write_text("an unreadable image")
    (root / "cats" / "7.png").write_bytes(image_bytes(7, "PNG"))
    (root / "cats" / "7.txt").write_text("unreadable metadata")
    (root / "cats" / "7.json").symlink_to(root / "cats" / "7.json")
    summary = prepare_ingest(str(root), str(tmp_path / "out"), val_samples=1, seed=2)
    assert summary["bad"] == {"missing_image": 1, "unreadable_caption": 1, "unreadable_image": 1, "bad_metadata": 1}
    assert summary["bad_examples"]["missing_image"] == [str(root / "gone.png")]
    samples = read_samples(tmp_path / "out", "train") + read_samples(tmp_path / "out", "val")
    assert sorted(s["caption"] for s in samples) == ["cat 0", "cat 1", "cat 2", "cat 3", "linked in"]


def test_too_few_usable_samples_say_why(tmp_path):
    """Every image missing (paths written relative to where pandas ran, not to the index): the error says that
    relative paths are relative to the index, with examples; a Hugging Face ImageFolder given as a folder points at
    its metadata.csv."""
    src = tmp_path / "src"
    write_index_images(src)
    (tmp_path / "index.csv").write_text("image,caption\n" + "".join(f"img/{i}.png,n {i}\n" for i in range(4)))
    with pytest.raises(ValueError, match=r"examples: .*index\.csv:2: img/0\.png.*default for 4 listed samples.*"
                                         rf"relative to its own folder, {tmp_path}$"):
        prepare_ingest(str(tmp_path / "index.csv"), str(tmp_path / "out"))
    (src / "img" / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,n {i}\n" for i in range(4)))
    with pytest.raises(ValueError, match=r"no usable samples .*missing_caption.*pass that index as SRC"):
        prepare_ingest(str(src / "img"), str(tmp_path / "out"))
    assert prepare_ingest(str(src / "img" / "metadata.csv"), str(tmp_path / "out"), val_samples=1)["bad"] == {}
