"""`mmray data tokenizer`: a tokenizer trained on the text of shards written by other tools (Python's tarfile in
PAX format, with member paths in PAX headers; img2dataset's Parquet layout on S3), through the real reader."""
import json
import tarfile
from pathlib import Path

import boto3
import pytest

from mmray import cli
from mmray.data.prepare import prepare_synthetic
from mmray.data.tokenizer import TextTokenizer
from mmray.data.vocab import train_from_shards
from tests.img2dataset_layout import jpeg, write_img2dataset

CAPTIONS = [
    "A red kite above the dunes.", "Two dogs chase a frisbee on wet sand!", "An old lighthouse, painted white.",
    "Fishing boats moored at dawn", "A child flies a red kite", "Gulls over the harbour wall",
    "Storm clouds gather over the bay", "Two dogs asleep by the fire", "A café terrace in the rain",
    "Lighthouse beam across the bay",
]
QA = {"question": "What colour is the kite?", "answer": "vermilion"}  # words only the metadata holds


# A folder name past ustar's 100-byte name field (and non-ASCII): tarfile stores each member's path in a PAX header.
DIR = "photos-" + "ø" * 60 + "/2024"


def _write_tar(path: Path, samples: list[tuple[str, bytes | None, dict | None]]) -> None:
    """A WebDataset shard as Python's tarfile writes one, PAX format: DIR/KEY.jpg, DIR/KEY.txt (unless None),
    DIR/KEY.json."""
    import io

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (key, caption, meta) in enumerate(samples):
            members = [(f"{DIR}/{key}.jpg", jpeg(i))]
            if caption is not None:
                members.append((f"{DIR}/{key}.txt", caption))
            if meta is not None:
                members.append((f"{DIR}/{key}.json", json.dumps(meta).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """Two shards: 10 good samples (one with QA metadata), one non-UTF-8 caption and one image without caption."""
    root = tmp_path / "shards"
    root.mkdir()
    good = [(f"s{i:03d}", c.encode(), {"url": f"https://example.com/{i}.jpg"}) for i, c in enumerate(CAPTIONS)]
    good[3] = (good[3][0], good[3][1], {"qa": [QA]})
    _write_tar(root / "00000.tar", good[:5] + [("bad0", b"caf\xe9 \xff", None)])
    _write_tar(root / "00001.tar", [("bad1", None, None)] + good[5:])
    assert b"path=" in (root / "00000.tar").read_bytes()  # the members' names are in PAX headers
    return root


def _single_tokens(tok: TextTokenizer, words: list[str]) -> list[str]:
    return [w for w in words if tok.tokenizer.token_to_id("\u2581" + w) is None]


def test_tokenizer_from_pax_tars_learns_the_captions_and_metadata_text(ray_session, shards, tmp_path):
    out = tmp_path / "tok" / "tokenizer.json"
    summary = train_from_shards(f"{shards}/{{00000..00001}}.tar", str(out), vocab_size=1024)
    assert summary["samples"] == 10 and summary["texts"] == 11 and summary["shards"] == 2
    assert summary["bad"] == {"non_utf8_caption": 1, "missing_caption": 1} and not summary["capped"]
    assert summary["bad_examples"]["non_utf8_caption"] == [f"{shards}/00000.tar:{DIR}/bad0"]  # the PAX path

    tok = TextTokenizer.from_file(str(out))
    assert summary["vocab_size"] == tok.vocab_size <= 1024
    # Every caption comes back from its ids as the tokenizer normalises it (lower case), with no [UNK]; every word of
    # the captions and of the metadata's question and answer became a token of its own (the vocabulary had room).
    unk = tok.tokenizer.token_to_id("[UNK]")
    for caption in CAPTIONS:
        ids = tok.tokenizer.encode(caption).ids
        assert unk not in ids and tok.decode(ids) == caption.lower(), caption
    words = {w.strip(".,!?").lower() for text in CAPTIONS + [QA["question"], QA["answer"]] for w in text.split()}
    assert _single_tokens(tok, sorted(words)) == []

    # Deterministic: the same source gives the same file, byte for byte.
    again = tmp_path / "again.json"
    train_from_shards(f"{shards}/{{00000..00001}}.tar", str(again), vocab_size=1024)
    assert again.read_bytes() == out.read_bytes()

    # --max-samples: the first N usable samples in shard order, and the summary says the text was capped.
    capped = train_from_shards(str(shards), str(tmp_path / "capped.json"), vocab_size=1024, max_samples=3)
    assert capped["samples"] == 3 and capped["capped"]
    assert _single_tokens(TextTokenizer.from_file(str(tmp_path / "capped.json")), ["lighthouse", "harbour"]) == [
        "harbour"]
    # A cap that every usable sample fits under left nothing out: not "capped".
    exact = train_from_shards(str(shards), str(tmp_path / "exact.json"), vocab_size=1024, max_samples=10)
    assert exact["samples"] == 10 and not exact["capped"]


def test_tokenizer_from_img2dataset_parquet_on_s3(ray_session, s3_bucket):
    keys = write_img2dataset(f"s3://{s3_bucket}/laion", shards=2, urls_per_shard=5, output_format="parquet",
                             failed_every=4)
    out = f"s3://{s3_bucket}/tokenizers/laion.json"
    summary = train_from_shards(f"s3://{s3_bucket}/laion/", out, vocab_size=256)
    # Failed downloads (status != success) are not samples; each successful row's caption was read.
    assert summary["samples"] == sum(len(k) for k in keys.values()) == 8 and summary["bad"] == {}
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="tokenizers/laion.json")["Body"].read()
    assert TextTokenizer.from_str(body.decode()).vocab_size == summary["vocab_size"]
    # A bucket that does not exist is refused before the read, naming it.
    with pytest.raises(ValueError, match=r"bucket 'no-such-bucket' of s3://no-such-bucket/t.json does not exist"):
        train_from_shards(f"s3://{s3_bucket}/laion/", "s3://no-such-bucket/t.json")


def test_a_prepared_data_set_gives_its_training_text_only(ray_session, tmp_path):
    root = tmp_path / "shapes"
    prepare_synthetic(str(root), samples=48, seed=2, val_samples=16, samples_per_shard=16, image_size=32)
    summary = train_from_shards(str(root), str(tmp_path / "tok.json"))
    assert summary["samples"] == 32 and summary["shards"] == 2


def test_cli_refuses_before_reading(shards, tmp_path, capsys):
    out = tmp_path / "tokenizer.json"
    out.write_text("keep me")
    cases = [
        ([str(shards), str(out)], f"{out} already exists; choose another path or pass --overwrite"),
        ([str(shards), str(tmp_path / "new.json"), "--vocab-size", "10"], "--vocab-size must be at least 128"),
        ([str(shards), str(tmp_path / "new.json"), "train.lr=1"], "only the data-reading keys"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "new.json")], "nowhere"),
        ([str(shards), str(tmp_path), "--overwrite"], f"{tmp_path} is a directory; OUT must name the file"),
        ([str(shards), "s3://some-bucket/"], "names a bucket or prefix; OUT must name the file"),
    ]
    for argv, needle in cases:
        assert cli.main(["data", "tokenizer", *argv]) == cli.EXIT_BAD_INPUT, argv
        last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert last["kind"] == "bad_input" and needle in last["error"], last
    assert out.read_text() == "keep me" and not (tmp_path / "new.json").exists()
