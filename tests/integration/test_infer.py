"""Batch inference end to end on the shapes data: `mmray embed`, `mmray search` and `mmray generate`, through the
CLI's own parser and runner, on one session Ray, locally and on S3 (moto over HTTP).

The export is a tiny model with random weights, written in exactly the format mmray.export.load reads: inference
must reproduce what the model computes, which needs no training.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pathlib import Path

import pytest
import torch

from mmray import cli, config, storage
from mmray.data.pipeline import decode_image
from mmray.data.tokenizer import TextTokenizer
from mmray.data.webdataset import build_tar, iter_tar_samples
from mmray.export import build_model, load, write_export

MODEL = ["data.image_size=32", "data.max_text_len=24", "model.image_depth=1", "model.text_depth=1",
         "model.image_width=64", "model.text_width=64", "model.embed_dim=32", "model.mlp_ratio=2"]
POOL = ["--actors", "1", "--max-bad-fraction", "0.5"]
A_SAMPLES, B_SAMPLES, C_SAMPLES = 20, 10, 10  # b.tar holds one corrupt image


def random_export(out: str, tokenizer: TextTokenizer, *overrides: str) -> str:
    """A random-weight export of a tiny model, as `mmray export` writes one (the manifest last)."""
    cfg = config.load(None, [*MODEL, *overrides])
    torch.manual_seed(0)
    write_export(out, build_model(cfg, tokenizer).state_dict(), cfg.to_yaml(), tokenizer.to_str(),
                 source="random")
    return out


@pytest.fixture(scope="module")
def exports(tiny_dataset, tmp_path_factory):
    """``late`` with a decoder trained (here: built) for captions and VQA, and ``early``, which cannot embed."""
    tok = TextTokenizer.from_file(os.path.join(tiny_dataset, "tokenizer.json"))
    root = tmp_path_factory.mktemp("exports")
    return {"late": random_export(str(root / "late"), tok, "model.decoder_depth=1", "model.vqa_weight=1"),
            "early": random_export(str(root / "early"), tok, "model.fusion=early")}


@pytest.fixture(scope="module")
def src(tiny_dataset, tmp_path_factory):
    """Three small shards from the held-out split: a.tar, b.tar (its second image corrupt) and c.parquet."""
    with open(os.path.join(tiny_dataset, "val", "00000.tar"), "rb") as f:
        samples = list(iter_tar_samples(f.read()))
    root = tmp_path_factory.mktemp("src")

    def members(chunk):
        return [(f"{s['__key__']}.{ext}", s[ext]) for s in chunk for ext in ("jpg", "txt", "json")]

    a = samples[:A_SAMPLES]
    b = [dict(s) for s in samples[A_SAMPLES:A_SAMPLES + B_SAMPLES]]
    b[1]["jpg"] = b"this is not a jpeg"
    c = samples[A_SAMPLES + B_SAMPLES:A_SAMPLES + B_SAMPLES + C_SAMPLES]
    (root / "a.tar").write_bytes(build_tar(members(a)))
    (root / "b.tar").write_bytes(build_tar(members(b)))
    pq.write_table(pa.table({"key": [s["__key__"] for s in c], "jpg": [s["jpg"] for s in c],
                             "txt": [s["txt"].decode() for s in c], "json": [s["json"].decode() for s in c]}),
                   root / "c.parquet")
    return str(root)


def mmray(*argv: str) -> tuple[int, dict]:
    """Run an `mmray` command in-process, as the console script would: (exit code, JSON summary)."""
    from mmray.infer.commands import register

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "embed" not in sub.choices:  # until mmray/cli.py registers the inference commands itself
        register(sub)
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.run(args.fn, args)
    return code, json.loads(out.getvalue().strip().splitlines()[-1])


def raw_samples(src: str) -> dict[tuple[str, str], dict]:
    """``{(shard path, key): {"jpg", "txt", "json"}}`` of every sample in SRC's shards, read without mmray."""
    out = {}
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.endswith(".tar"):
            with open(path, "rb") as f:
                for s in iter_tar_samples(f.read()):
                    out[(path, s["__key__"])] = s
        elif name.endswith(".parquet"):
            for row in pq.read_table(path).to_pylist():
                out[(path, row["key"])] = {"jpg": row["jpg"], "txt": row["txt"].encode(), "json": row["json"].encode()}
    return out


def read_rows(out: str) -> list[dict]:
    files = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    return [row for f in files for row in pq.read_table(os.path.join(out, f)).to_pylist()]


USABLE = A_SAMPLES + B_SAMPLES - 1 + C_SAMPLES


@pytest.fixture(scope="module")
def embedded(ray_session, exports, src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("embedded") / "out")
    code, summary = mmray("embed", exports["late"], src, out, *POOL)
    assert code == 0, summary
    return out, summary


def test_embed_writes_the_models_own_embeddings(embedded, exports, src):
    out, summary = embedded
    assert summary["samples"] == summary["rows"] == USABLE
    assert summary["bad"] == {"corrupt_image": 1} and summary["samples_read"] == USABLE + 1
    assert (summary["shards_written"], summary["shards_skipped"]) == (3, 0)
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    assert sorted(f for f in os.listdir(out) if not f.startswith((".", "_"))) == \
        ["a.tar.parquet", "b.tar.parquet", "c.parquet.parquet"]
    assert pq.read_schema(os.path.join(out, "a.tar.parquet")).names == \
        ["key", "shard", "source", "caption", "image_embedding", "text_embedding"]

    rows = read_rows(out)
    samples = raw_samples(src)
    assert len(rows) == USABLE and len({(r["shard"], r["key"]) for r in rows}) == USABLE
    model, cfg, tok = load(exports["late"])
    with torch.no_grad():
        for row in rows:  # one by one, through the model's own forward
            sample = samples[(row["shard"], row["key"])]
            assert row["caption"] == sample["txt"].decode()
            image = torch.from_numpy(decode_image(sample["jpg"], cfg.data.image_size))[None]
            ids = torch.from_numpy(tok.encode_batch([row["caption"]], cfg.data.max_text_len))
            expected = model(image, ids)
            np.testing.assert_allclose(row["image_embedding"], expected["image_embeds"][0].numpy(), atol=1e-5)
            np.testing.assert_allclose(row["text_embedding"], expected["text_embeds"][0].numpy(), atol=1e-5)


def test_embed_resumes_only_the_missing_shard(embedded, exports, src):
    out, _ = embedded
    kept = os.path.join(out, "a.tar.parquet")
    before = os.stat(kept).st_mtime_ns
    os.remove(os.path.join(out, "b.tar.parquet"))
    code, summary = mmray("embed", exports["late"], src, out, *POOL)
    assert code == 0, summary
    assert (summary["shards_written"], summary["shards_skipped"]) == (1, 2)
    assert summary["samples"] == B_SAMPLES - 1 and summary["bad"] == {"corrupt_image": 1}
    assert os.stat(kept).st_mtime_ns == before
    assert len(read_rows(out)) == USABLE
    code, summary = mmray("embed", exports["late"], src, out, *POOL)  # all there: nothing to do, no Ray work
    assert code == 0 and (summary["shards_written"], summary["shards_skipped"], summary["samples"]) == (0, 3, 0)


def test_search_text_to_image_and_image_to_text(embedded, exports, src, tmp_path):
    from mmray.infer.embed import image_embeddings, text_embeddings

    out, _ = embedded
    rows = read_rows(out)
    model, cfg, tok = load(exports["late"])
    images = np.array([r["image_embedding"] for r in rows])
    texts = np.array([r["text_embedding"] for r in rows])

    sheet = tmp_path / "sheet.png"
    code, summary = mmray("search", out, "a red circle", "--k", "3", "--contact-sheet", str(sheet))
    assert code == 0, summary
    with torch.no_grad():
        query = text_embeddings(model, torch.from_numpy(tok.encode_batch(["a red circle"], 24)))[0].numpy()
    order = np.argsort(-(images @ query))
    assert [h["key"] for h in summary["hits"]] == [rows[i]["key"] for i in order[:3]]
    assert summary["hits"][0]["score"] == pytest.approx(float(images[order[0]] @ query), abs=1e-5)
    assert set(summary["hits"][0]) == {"key", "caption", "score", "shard", "source"}
    from PIL import Image
    with Image.open(sheet) as png:
        assert png.format == "PNG" and png.size[0] >= 3 * 100

    image_path = tmp_path / "query.jpg"
    image_path.write_bytes(raw_samples(src)[(rows[5]["shard"], rows[5]["key"])]["jpg"])
    code, summary = mmray("search", out, "--image", str(image_path), "--k", "2")
    assert code == 0, summary
    with torch.no_grad():
        query = image_embeddings(model, torch.from_numpy(decode_image(image_path.read_bytes(), 32))[None])[0].numpy()
    best = int(np.argmax(texts @ query))
    assert summary["hits"][0]["caption"] == rows[best]["caption"]
    assert len({h["caption"] for h in summary["hits"]}) == 2  # one hit per distinct caption


def test_search_finds_the_export_from_any_directory(ray_session, exports, src, tmp_path, monkeypatch):
    """OUT records the export by its absolute path: embedded with a relative EXPORT, searched from elsewhere."""
    export = Path(exports["late"])
    monkeypatch.chdir(export.parent)
    out = str(tmp_path / "out")
    code, summary = mmray("embed", export.name, os.path.join(src, "c.parquet"), out, *POOL)
    assert code == 0, summary
    monkeypatch.chdir(tmp_path)
    code, summary = mmray("search", out, "a red circle", "--k", "1")
    assert code == 0 and summary["export"] == str(export) and len(summary["hits"]) == 1, summary


def test_search_finds_a_known_embedding(embedded):
    from mmray.infer.search import search_vector

    out, _ = embedded
    rows = read_rows(out)
    for row in (rows[0], rows[17], rows[-1]):
        hits = search_vector(out, np.array(row["image_embedding"]), "image_embedding", k=1)
        assert (hits[0]["key"], hits[0]["shard"]) == (row["key"], row["shard"])
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_commands_refuse_what_the_export_cannot_do(exports, src, tmp_path):
    code, summary = mmray("embed", exports["early"], src, str(tmp_path / "e"))
    assert code == 2 and "late" in summary["error"] and "attention" in summary["error"]
    code, summary = mmray("generate", exports["early"], src, str(tmp_path / "g"))
    assert code == 2 and "decoder" in summary["error"]
    code, summary = mmray("embed", exports["late"], str(tmp_path / "missing"), str(tmp_path / "e"))
    assert code == 2 and "missing" in summary["error"]
    assert not (tmp_path / "e").exists() and not (tmp_path / "g").exists()
    code, summary = mmray("search", str(tmp_path / "e"), "a red circle")
    assert code == 2 and "holds no embeddings" in summary["error"]


def test_search_refuses_a_bad_query(embedded, tmp_path):
    out, _ = embedded
    (tmp_path / "q.jpg").write_bytes(b"not an image")
    code, summary = mmray("search", out, "--image", str(tmp_path / "q.jpg"))
    assert code == 2 and "corrupt_image" in summary["error"]
    code, summary = mmray("search", out, "a red circle", "--image", str(tmp_path / "q.jpg"))
    assert code == 2 and "not both" in summary["error"]
    code, summary = mmray("search", out, "  ")
    assert code == 2 and summary["error"].startswith("the query text is empty"), summary


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_generate_captions(ray_session, exports, src, tmp_path, fmt):
    out = tmp_path / "captions"
    code, summary = mmray("generate", exports["late"], src, str(out), "--format", fmt, "--max-new-tokens", "4",
                          *POOL)
    assert code == 0, summary
    assert summary["samples"] == summary["rows"] == USABLE and summary["bad"] == {"corrupt_image": 1}
    files = sorted(f for f in os.listdir(out) if f.endswith(fmt))
    assert files == [f"a.tar.{fmt}", f"b.tar.{fmt}", f"c.parquet.{fmt}"]
    if fmt == "parquet":
        rows = read_rows(str(out))
    else:
        rows = [json.loads(line) for f in files for line in (out / f).read_text().splitlines()]
    assert len(rows) == USABLE and set(rows[0]) == {"key", "shard", "source", "caption", "generated"}
    samples = raw_samples(src)
    assert all(r["caption"] == samples[(r["shard"], r["key"])]["txt"].decode() for r in rows)
    assert all(isinstance(r["generated"], str) for r in rows)


def test_generate_vqa_answers_every_question(ray_session, exports, src, tmp_path):
    out = tmp_path / "vqa"
    code, summary = mmray("generate", exports["late"], src, str(out), "--task", "vqa", "--beam", "2",
                          "--format", "jsonl", "--max-new-tokens", "3", *POOL)
    assert code == 0, summary
    rows = [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]
    usable = [s for s in raw_samples(src).values() if s["jpg"] != b"this is not a jpeg"]
    questions = sum(len(json.loads(s["json"])["qa"]) for s in usable)
    assert questions > USABLE and summary["rows"] == len(rows) == questions
    assert set(rows[0]) == {"key", "shard", "source", "question", "answer", "qa_type", "generated"}


def test_embed_search_and_generate_on_s3(ray_session, s3_bucket, exports, src):
    base = f"s3://{s3_bucket}"
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f:
            storage.write_bytes(f"{base}/data/{name}", f.read())
    for name in os.listdir(exports["late"]):
        with open(os.path.join(exports["late"], name), "rb") as f:
            storage.write_bytes(f"{base}/export/{name}", f.read())
    code, summary = mmray("embed", f"{base}/export", f"{base}/data", f"{base}/emb", *POOL)
    assert code == 0, summary
    assert summary["samples"] == USABLE and summary["bad"] == {"corrupt_image": 1} and summary["shards_written"] == 3
    outputs = storage.list_files(f"{base}/emb", ".parquet")
    assert len(outputs) == 3
    rows = [r for p in outputs for r in pq.read_table(io.BytesIO(storage.read_bytes(p))).to_pylist()]
    assert len(rows) == USABLE and all(r["shard"].startswith(f"{base}/data/") for r in rows)

    storage.delete(f"{base}/emb/a.tar.parquet")
    code, summary = mmray("embed", f"{base}/export", f"{base}/data", f"{base}/emb", *POOL)
    assert code == 0 and (summary["shards_written"], summary["shards_skipped"]) == (1, 2)
    code, summary = mmray("search", f"{base}/emb", "a blue square", "--k", "2")
    assert code == 0 and len(summary["hits"]) == 2 and summary["export"] == f"{base}/export"

    code, summary = mmray("generate", f"{base}/export", f"{base}/data", f"{base}/gen", "--task", "vqa",
                          "--format", "jsonl", *POOL)
    assert code == 0, summary
    written = storage.list_files(f"{base}/gen", ".jsonl")
    rows = [json.loads(line) for p in written for line in storage.read_text(p).splitlines()]
    usable = [s for s in raw_samples(src).values() if s["jpg"] != b"this is not a jpeg"]
    assert len(written) == 3 and summary["rows"] == len(rows) == sum(len(json.loads(s["json"])["qa"]) for s in usable)


def test_search_retrieval_matches_mmray_eval(embedded, exports, src):
    """Recall@k computed from `search` over what `embed` wrote equals `mmray eval` on the same export and data."""
    from mmray.eval.run import run_eval
    from mmray.infer.search import search_vector

    out, _ = embedded
    rows = read_rows(out)
    evaluated = run_eval(exports["late"], src, max_samples=0, overrides=["eval.generate=false"])["metrics"]
    assert evaluated["eval_pairs"] == len(rows) == USABLE
    for k in (1, 5):
        for direction, query, against in (("i2t", "image_embedding", "text_embedding"),
                                          ("t2i", "text_embedding", "image_embedding")):
            hits = [any(h["caption"] == row["caption"] for h in
                        search_vector(out, np.array(row[query]), against, k=k)) for row in rows]
            assert sum(hits) / len(rows) == pytest.approx(evaluated[f"{direction}_r@{k}"]), (direction, k)


def test_embed_and_generate_from_a_folder_and_a_csv_index(ray_session, exports, src, tmp_path):
    """A folder of images with same-named captions, and a CSV index of path and caption, go through the same
    commands: written once as shards under OUT/_staged (reused by a rerun), the bad samples counted."""
    import csv

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    samples = list(raw_samples(src).values())
    usable = [s for s in samples if s["jpg"] != b"this is not a jpeg"][:6]
    files = {}  # caption -> the image file
    for i, s in enumerate(usable):
        where = folder / "sub" if i % 2 else folder
        (where / f"img{i}.jpg").write_bytes(s["jpg"])
        (where / f"img{i}.txt").write_bytes(s["txt"])
        files[s["txt"].decode()] = str(where / f"img{i}.jpg")
    (folder / "no_caption.jpg").write_bytes(usable[0]["jpg"])
    out = str(tmp_path / "emb")
    code, summary = mmray("embed", exports["late"], str(folder), out, *POOL)
    assert code == 0, summary
    assert summary["samples"] == 6 and summary["bad"] == {"missing_caption": 1} and summary["shards_written"] == 1
    rows = read_rows(out)
    assert sorted(r["caption"] for r in rows) == sorted(s["txt"].decode() for s in usable)
    # Each row and each search hit names the user's own image file, not the staged shard's key alone.
    assert {r["caption"]: r["source"] for r in rows} == files
    code, found = mmray("search", out, usable[2]["txt"].decode(), "--k", "3")
    assert code == 0 and all(h["source"] == files[h["caption"]] for h in found["hits"]), found
    code, again = mmray("embed", exports["late"], str(folder), out, *POOL)
    assert code == 0 and (again["shards_written"], again["shards_skipped"]) == (0, 1)
    assert again["bad"] == {}, again  # the staged source was not read again: its left-out sample is not counted
    # Captioning reads no caption: the image without one is captioned too.
    code, gen = mmray("generate", exports["late"], str(folder), str(tmp_path / "captioned"), "--format", "jsonl",
                      *POOL)
    assert code == 0 and (gen["rows"], gen["bad"]) == (7, {}), gen
    captioned = [json.loads(line) for f in sorted((tmp_path / "captioned").glob("*.jsonl"))
                 for line in f.read_text().splitlines()]
    assert sorted(r["source"] for r in captioned) == sorted([*files.values(), str(folder / "no_caption.jpg")])

    # The samples staging left out count against the bad-sample limit like the reader's own.
    code, strict = mmray("embed", exports["late"], str(folder), str(tmp_path / "strict"), "--actors", "1",
                         "--max-bad-fraction", "0.1")
    assert code == 2 and strict["error"].startswith("1 of 7 samples (14.3%) are bad, over data.max_bad_fraction=0.1")
    assert str(folder / "no_caption.jpg") in strict["error"]
    # Rerun on the same OUT: the staged shards are reused, and the sample staging left out is still counted, once,
    # with its example.
    code, again = mmray("embed", exports["late"], str(folder), str(tmp_path / "strict"), "--actors", "1",
                        "--max-bad-fraction", "0.1")
    assert code == 2 and again["error"] == strict["error"], again

    index = tmp_path / "index.csv"
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "question", "answer"])  # a VQA index: one question per row
        for i in range(4):
            w.writerow([f"photos/{'sub/' if i % 2 else ''}img{i}.jpg", usable[i]["txt"].decode(),
                        "how many shapes are there?", i + 1])
        w.writerow(["photos/missing.jpg", "a caption for nothing", "what colour is it?", "red"])
    code, summary = mmray("generate", exports["late"], str(index), str(tmp_path / "gen"), "--format", "jsonl",
                          *POOL)
    assert code == 0, summary
    assert summary["rows"] == 4 and summary["bad"] == {"missing_image": 1}
    code, summary = mmray("generate", exports["late"], str(index), str(tmp_path / "vqa"), "--task", "vqa", *POOL)
    assert code == 0 and summary["rows"] == 4, summary
    answered = read_rows(str(tmp_path / "vqa"))
    assert sorted((r["question"], r["answer"]) for r in answered) == [("how many shapes are there?", str(i + 1))
                                                                       for i in range(4)]

    # An index whose columns are not found says how to name them (the inference commands have no column options),
    # and OUT, which got no output, is left free: no manifest that would refuse the next run.
    odd = tmp_path / "odd.csv"
    odd.write_text("file,words\nphotos/img0.jpg,a caption\n")
    code, summary = mmray("embed", exports["late"], str(odd), str(tmp_path / "odd"), *POOL)
    assert code == 2 and summary["error"].count(str(odd)) == 2, summary  # once, and in the suggested command
    assert summary["error"].startswith(f"{odd}: no image column") and "mmray data prepare" in summary["error"]
    assert not (tmp_path / "odd" / "_manifest.json").exists()

    # Both in one command: each staged source keeps its own output names.
    code, both = mmray("embed", exports["late"], str(folder), str(index), str(tmp_path / "both"), *POOL)
    assert code == 0, both
    assert both["samples"] == 10 and both["bad"] == {"missing_caption": 1, "missing_image": 1}
    assert both["shards_written"] == 2 and len(read_rows(str(tmp_path / "both"))) == 10


def test_a_file_for_a_directory_and_a_damaged_manifest_are_bad_input(exports, src, tmp_path):
    """Exit 2 (bad input) naming the path, not a traceback and exit 1."""
    import shutil

    weights = os.path.join(exports["late"], "model.safetensors")
    code, summary = mmray("eval", weights, "--data", src)
    assert code == 2 and summary["kind"] == "bad_input" and weights in summary["error"], summary
    broken = tmp_path / "broken"
    shutil.copytree(exports["late"], broken)
    (broken / "manifest.json").write_text("{not json")
    code, summary = mmray("embed", str(broken), src, str(tmp_path / "out"))
    assert code == 2 and summary["error"].startswith(f"{broken}/manifest.json is not valid JSON"), summary
