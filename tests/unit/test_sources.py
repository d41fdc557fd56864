"""Data sources as users write them (prefixes, files, brace patterns, '::' parts), img2dataset's stats and Parquet,
and weighted mixing: exact paths, counts and error messages, on real files in img2dataset's own layout."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from mmray import config
from mmray.data.mixing import Resample, copies, parse_weights
from mmray.data.reader import iter_parquet, iter_tar
from mmray.data.sources import (SHARD_NAMES, SourceError, count_samples, expand_braces, inspect_shards, list_shards,
                                parts, tar_codec, total_samples)
from mmray.data.tokenizer import TextTokenizer, train_tokenizer
from mmray.data.webdataset import build_tar
from tests.img2dataset_layout import jpeg, write_img2dataset


@pytest.mark.parametrize("pattern, expected", [
    ("s3://b/laion/{00000..00003}.tar", [f"s3://b/laion/0000{i}.tar" for i in range(4)]),
    ("{8..11}.tar", ["8.tar", "9.tar", "10.tar", "11.tar"]),      # unpadded ends: no padding
    ("{008..10}.tar", ["008.tar", "009.tar", "010.tar"]),          # a padded end sets the width
    ("{3..1}", ["3", "2", "1"]),
    ("{0..10..5}", ["0", "5", "10"]),
    ("x/{a,b}/{0..1}.tar", ["x/a/0.tar", "x/a/1.tar", "x/b/0.tar", "x/b/1.tar"]),
    ("{a,b{1,2}}.tar", ["a.tar", "b1.tar", "b2.tar"]),             # nested
    ("{a,,b}", ["a", "", "b"]),
    ("{a,a,b}", ["a", "b"]),                                        # duplicates once
    ("plain.tar", ["plain.tar"]),
])
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize("pattern, message", [
    ("{00000..00099.tar", "unbalanced '{'"),
    ("00000}.tar", "unbalanced '}'"),
    ("{shard}.tar", r"\{shard\} in '\{shard\}.tar' is neither a list"),
    ("{1..5..0}", "step of a range cannot be 0"),
])
def test_bad_brace_patterns_name_the_problem(pattern, message):
    with pytest.raises(SourceError, match=message):
        expand_braces(pattern)


def test_config_checks_source_syntax_and_weights():
    cfg = config.load(None, ["data.source=s3://b/a/::s3://b/{0..3}.tar", "data.source_weights=1::2.5"])
    assert parse_weights(cfg.data.source_weights, 2) == [1.0, 2.5]
    for overrides, message in [
        (["data.source=a::b", "data.source_weights=1"], r"data.source_weights: 1 weight\(s\) '1' for 2 source"),
        (["data.source=a::b", "data.source_weights=1::x"], "data.source_weights: weight 'x' .* is not a number"),
        (["data.source=a::b", "data.source_weights=0::0"], "are all 0"),
        (["data.source=a::b", "data.source_weights=1::-1"], ">= 0"),
        (["data.source=::a"], "data.source: '::a' has an empty part"),
        (["data.source=x/{1..}.tar"], r"data.source: \{1..\} in"),
        (["data.val_source=x/{1,2.tar"], "data.val_source: unbalanced"),
        (["data.source=synthetic:shapes::b"], "cannot be mixed"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.load(None, overrides)


def test_img2dataset_prefix_lists_tars_not_their_metadata_parquet(tmp_path):
    tars = write_img2dataset(str(tmp_path / "laion"), shards=3, urls_per_shard=5, failed_every=2)
    parquets = write_img2dataset(str(tmp_path / "cc"), shards=2, urls_per_shard=4, output_format="parquet")
    assert sorted(p.name for p in (tmp_path / "laion").iterdir()) == [
        f"0000{i}{s}" for i in range(3) for s in (".parquet", ".tar", "_stats.json")]
    assert list_shards(str(tmp_path / "laion")) == list(tars)
    assert list_shards(str(tmp_path / "cc")) == list(parquets)
    # a list ('::'), a prefix and a brace pattern, in the order given
    spec = f"{tmp_path}/cc/::{tmp_path}/laion/{{00001..00002}}.tar"
    assert inspect_shards(spec) == list(parquets) + list(tars)[1:]
    assert [p.prepared for p in parts(spec)] == [False, False]


def test_compressed_tars_are_shards_with_their_stats_and_metadata_parquet(tmp_path):
    """img2dataset's layout with the tars compressed (``gzip 0000*.tar``, or webdataset's ``.tgz``): the tars are the
    shards, the metadata Parquet beside each is not, and each one's ``_stats.json`` gives its count."""
    import gzip

    tars = write_img2dataset(str(tmp_path), shards=3, urls_per_shard=6, failed_every=3)
    for i, (tar, suffix) in enumerate(zip(tars, (".tar.gz", ".tgz", ".tar"))):
        if suffix != ".tar":
            (tmp_path / f"0000{i}{suffix}").write_bytes(gzip.compress((tmp_path / f"0000{i}.tar").read_bytes()))
            (tmp_path / f"0000{i}.tar").unlink()
    shards = [f"{tmp_path}/00000.tar.gz", f"{tmp_path}/00001.tgz", f"{tmp_path}/00002.tar"]
    assert list_shards(str(tmp_path)) == shards
    assert [tar_codec(p) for p in shards] == ["gzip", "gzip", None]
    assert count_samples(shards) == {p: 4 for p in shards}
    assert inspect_shards(f"{tmp_path}/{{00000.tar.gz,00001.tgz}}") == shards[:2]
    # One shard in two forms would be read twice; a tar Arrow cannot decompress would be left out: both refused.
    (tmp_path / "00002.tar.zst").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"^{tmp_path}/00002.tar and {tmp_path}/00002.tar.zst are one shard under "
                                         "two names: its samples would be read twice; keep one of them$"):
        list_shards(str(tmp_path))
    (tmp_path / "00002.tar.zst").unlink()
    (tmp_path / "raw-download.tar.xz").write_bytes(b"x")  # not named like a shard: left out, with a warning
    assert list_shards(str(tmp_path)) == shards
    (tmp_path / "00003.tar.xz").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"^{tmp_path}/00003.tar.xz .under {tmp_path}. is not a shard "
                                         ".* cannot stream; decompress it, or recompress it as .tar.gz or .tar.zst$"):
        list_shards(str(tmp_path))
    with pytest.raises(ValueError, match=r"00003.tar.xz \(from .*\) is not a shard .* cannot stream"):
        inspect_shards(f"{tmp_path}/{{00002.tar,00003.tar.xz}}")


def test_shard_suffixes_in_any_case_and_a_shard_named_twice(tmp_path):
    """`00001.TAR` (a case-insensitive file system, or the tool that wrote it) is a shard like `00000.tar`, never
    left out without a word; and `mmray data inspect` refuses a shard that two parts name, as training does, instead
    of reading it twice."""
    import gzip

    write_img2dataset(str(tmp_path), shards=3, urls_per_shard=3)
    (tmp_path / "00001.tar").rename(tmp_path / "00001.TAR")
    (tmp_path / "00002.Tar.GZ").write_bytes(gzip.compress((tmp_path / "00002.tar").read_bytes()))
    (tmp_path / "00002.tar").unlink()
    shards = [f"{tmp_path}/00000.tar", f"{tmp_path}/00001.TAR", f"{tmp_path}/00002.Tar.GZ"]
    assert list_shards(str(tmp_path)) == shards
    assert [tar_codec(p) for p in shards] == [None, None, "gzip"]
    assert count_samples(shards) == {p: 3 for p in shards}  # each one's _stats.json
    assert inspect_shards(f"{tmp_path}/{{00000.tar,00001.TAR}}") == shards[:2]
    for spec in (f"{tmp_path}/::{tmp_path}/00000.tar", f"{tmp_path}/{{00000.tar,00001.TAR}}::{tmp_path}/00000.tar"):
        with pytest.raises(SourceError, match=f"shard {tmp_path}/00000.tar is named by more than one part"):
            inspect_shards(spec)


def test_missing_shards_fail_fast_naming_the_path_unless_allowed(tmp_path, caplog):
    write_img2dataset(str(tmp_path), shards=2, urls_per_shard=3, first_shard=0)
    write_img2dataset(str(tmp_path), shards=1, urls_per_shard=3, first_shard=3)
    spec = f"{tmp_path}/{{00000..00004}}.tar"
    with pytest.raises(ValueError, match=rf"shard does not exist: {tmp_path}/00002.tar \(and 1 more\), named by "
                                         rf".*data.allow_missing_shards=true"):
        inspect_shards(spec)
    assert inspect_shards(spec, allow_missing=True) == [f"{tmp_path}/0000{i}.tar" for i in (0, 1, 3)]
    assert "skipping 2 missing shard(s)" in caplog.text and f"{tmp_path}/00004.tar" in caplog.text
    with pytest.raises(ValueError, match=f"none of the 2 shard.* exists .first: {tmp_path}/00007.tar"):
        inspect_shards(f"{tmp_path}/{{00007,00008}}.tar", allow_missing=True)
    with pytest.raises(ValueError, match=f"shard does not exist: {tmp_path}/no/00000.tar"):
        inspect_shards(f"{tmp_path}/no/00000.tar")
    with pytest.raises(ValueError, match=f"no shards .{SHARD_NAMES}. under {tmp_path}/empty$"):
        (tmp_path / "empty").mkdir()
        inspect_shards(f"{tmp_path}/empty")
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "cats" / "1.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ValueError, match=f"no shards .{SHARD_NAMES}. under {tmp_path}/photos; it holds 1 image "
                                         rf"file\(s\) \(e.g. {tmp_path}/photos/cats/1.jpg\): write them as shards "
                                         rf"first, `mmray data prepare {tmp_path}/photos DEST`"):
        inspect_shards(f"{tmp_path}/photos")
    for name, hint in [("index.csv", f"an index of images: write them as shards first, `mmray data prepare "
                                     f"{tmp_path}/index.csv DEST`"),
                       ("shards.tar.xz", "a tar compressed with a codec that Arrow cannot stream; decompress it, "
                                         "or recompress it as .tar.gz or .tar.zst"),
                       ("notes.md", "give a shard, a directory of them, or a prepared data set")]:
        (tmp_path / name).write_text("x")
        with pytest.raises(ValueError, match=f"^{tmp_path}/{name} is a file but not a shard .{SHARD_NAMES}.; "
                                             f"it is {hint}" if "give" not in hint else hint):
            inspect_shards(f"{tmp_path}/{name}")


def test_stats_json_gives_sample_counts(tmp_path):
    shards = write_img2dataset(str(tmp_path), shards=3, urls_per_shard=10, failed_every=3)
    counts = count_samples(shards)
    assert counts == {path: 7 for path in shards}  # successes, not count (10) nor failures (3)
    assert total_samples(counts) == 21
    assert total_samples(counts, {path: w for path, w in zip(shards, (1, 2, 0.5))}) == round(7 + 14 + 3.5)
    (tmp_path / "00001_stats.json").write_text("not json")
    (tmp_path / "00002_stats.json").unlink()
    counts = count_samples(shards)
    assert list(counts.values()) == [7, None, None] and total_samples(counts) is None


def test_img2dataset_parquet_output_reads_successes_with_its_caption_column(tmp_path):
    (path, keys), = write_img2dataset(str(tmp_path), shards=1, urls_per_shard=9, output_format="parquet",
                                      failed_every=4).items()
    table = pa.parquet.read_table(path)
    assert {"key", "jpg", "caption", "url", "status", "error_message", "width"} <= set(table.column_names)
    assert table.num_rows == 9 and table.column("jpg").null_count == 2  # failed URLs are rows without an image
    rows = pa.concat_tables(iter_parquet(open(path, "rb").read(), path, 4)).to_pylist()
    assert [r["key"] for r in rows] == keys and len(keys) == 7
    assert all(r["error"] == "" and r["image"] and r["caption"] == f"photo 0 {r['key']}".encode() for r in rows)
    with pytest.raises(ValueError, match=r"no caption column \('text'\); it has .*Set data.caption_column"):
        list(iter_parquet(open(path, "rb").read(), path, 4, caption_column="text"))


class _Flaky(io.RawIOBase):
    """A stream that fails with a network error after ``limit`` bytes, as a dropped S3 connection does."""

    def __init__(self, data: bytes, limit: int):
        self.data, self.limit, self.pos = data, limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.limit:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset")
        n = len(self.data) - self.pos if n < 0 else n
        chunk = self.data[self.pos:min(self.pos + n, self.limit)]
        self.pos += len(chunk)
        return chunk


def test_a_broken_stream_is_raised_not_taken_for_a_truncated_tar():
    members = [(f"{i:09d}.{ext}", jpeg(i) if ext == "jpg" else b"x") for i in range(6) for ext in ("jpg", "txt")]
    data = build_tar(members)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        list(iter_tar(_Flaky(data, len(data) // 2), "s.tar", 4))
    # a tar that really ends early is still a counted bad sample
    rows = pa.concat_tables(iter_tar(io.BytesIO(data[:len(data) // 2]), "s.tar", 4)).to_pylist()
    assert rows[-1]["error"].startswith("truncated_shard") and tarfile.BLOCKSIZE


def _raw_batch(shards: list[str], per_shard: int) -> dict[str, np.ndarray]:
    keys = [f"{s}-{i:04d}" for s in range(len(shards)) for i in range(per_shard)]
    names = [shard for shard in shards for _ in range(per_shard)]
    return {"key": np.array(keys, dtype=object), "shard": np.array(names, dtype=object),
            "image": np.array([k.encode() for k in keys], dtype=object)}


def test_resample_uses_each_part_weight_times_per_sample_deterministically():
    batch = _raw_batch(["/a/00000.tar", "/b/00000.tar", "/c/00000.tar"], 2000)
    weights = {"/a/00000.tar": 2.0, "/b/00000.tar": 0.25, "/c/00000.tar": 1.5}
    out = Resample(weights, seed=7)(batch)
    per_shard = {s: int((out["shard"] == s).sum()) for s in weights}
    assert per_shard["/a/00000.tar"] == 4000                   # integer weights are exact
    assert abs(per_shard["/b/00000.tar"] - 500) < 4 * 20       # binomial(2000, 0.25): sd ~19
    assert abs(per_shard["/c/00000.tar"] - 3000) < 4 * 23
    assert len(set(out["key"])) == len(out["key"])             # copies get their own keys: KEY, KEY~1, ...
    assert {"0-0000", "0-0000~1"} <= set(out["key"])
    assert np.array_equal(out["image"][out["key"] == "0-0000~1"], [b"0-0000"])
    again = Resample(weights, seed=7)(batch)
    assert list(again["key"]) == list(out["key"])              # same seed, same samples
    other = Resample(weights, seed=8)(batch)
    assert set(other["key"]) != set(out["key"])
    # per sample, not per block: a sample's fate does not depend on the batch it arrives in
    halves = [Resample(weights, seed=7)({k: v[i::2] for k, v in batch.items()}) for i in (0, 1)]
    assert sorted(k for h in halves for k in h["key"]) == sorted(out["key"])
    assert copies(0.0, 7, "/a/x.tar", "k") == 0 and copies(3.0, 7, "/a/x.tar", "k") == 3


def _tokenizer(path) -> str:
    TextTokenizer(train_tokenizer([f"photo {i}" for i in range(50)], vocab_size=128)).save(str(path))
    return str(path)


def test_resolve_data_from_img2dataset_prefixes_with_weights(tmp_path):
    from mmray.train.trainer import resolve_data

    laion = write_img2dataset(str(tmp_path / "laion"), shards=2, urls_per_shard=10, failed_every=5)
    cc = write_img2dataset(str(tmp_path / "cc"), shards=1, urls_per_shard=6, output_format="parquet", seed=1)
    val = write_img2dataset(str(tmp_path / "val"), shards=1, urls_per_shard=4, seed=2)
    source = f"{tmp_path}/laion/::{tmp_path}/cc/{{00000..00000}}.parquet"
    base = [f"data.source={source}", "data.source_weights=1::3"]
    with pytest.raises(config.ConfigError, match="data.val_source: data.source .* names shards, not a prepared"):
        resolve_data(config.load(None, base))
    with pytest.raises(config.ConfigError, match="data.tokenizer: data.source .* has no prepared data set"):
        resolve_data(config.load(None, base + [f"data.val_source={tmp_path}/val"]))
    data = resolve_data(config.load(None, base + [f"data.val_source={tmp_path}/val",
                                                  f"data.tokenizer={_tokenizer(tmp_path / 'tok.json')}"]))
    assert data.train == list(laion) + list(cc) and data.val == list(val)
    assert data.weights == {**dict.fromkeys(laion, 1.0), **dict.fromkeys(cc, 3.0)}
    assert data.train_samples == 2 * 8 + 3 * 6
    plain = resolve_data(config.load(None, [f"data.source={tmp_path}/laion", f"data.val_source={tmp_path}/val",
                                            f"data.tokenizer={tmp_path / 'tok.json'}"]))
    assert plain.weights is None and plain.train_samples == 16


def test_resolve_data_mixes_prepared_data_sets(tmp_path):
    from mmray.train.trainer import resolve_data

    for name in ("a", "b"):
        for split, n in (("train", 4), ("val", 2)):
            write_img2dataset(str(tmp_path / name / split), shards=1, urls_per_shard=n)
    _tokenizer(tmp_path / "a" / "tokenizer.json")
    data = resolve_data(config.load(None, [f"data.source={tmp_path}/a::{tmp_path}/b/"]))
    assert data.train == [f"{tmp_path}/{n}/train/00000.tar" for n in "ab"]
    assert data.val == [f"{tmp_path}/{n}/val/00000.tar" for n in "ab"]
    assert data.tokenizer.vocab_size > 0 and data.train_samples == 8 and data.weights is None
    assert json.loads((tmp_path / "a" / "train" / "00000_stats.json").read_text())["successes"] == 4


def test_a_prepared_data_set_without_a_val_split_asks_for_data_val_source(tmp_path):
    """`mmray data prepare ... --val-samples 0` writes no val/; training on it names the key to set."""
    import io

    from PIL import Image

    from mmray.data.ingest import prepare_ingest
    from mmray.train.trainer import resolve_data

    (tmp_path / "photos").mkdir()
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(buf, format="PNG")
        (tmp_path / "photos" / f"{i}.png").write_bytes(buf.getvalue())
        (tmp_path / "photos" / f"{i}.txt").write_text(f"photo {i}")
    prepare_ingest(str(tmp_path / "photos"), str(tmp_path / "ds"), val_samples=0)
    with pytest.raises(config.ConfigError, match=f"data.val_source: the prepared data set {tmp_path}/ds has no val/ "
                                                 r"split \(it was prepared with --val-samples 0\)"):
        resolve_data(config.load(None, [f"data.source={tmp_path}/ds"]))
    data = resolve_data(config.load(None, [f"data.source={tmp_path}/ds", f"data.val_source={tmp_path}/ds/train"]))
    assert data.val == data.train and len(data.train) == 1


def test_a_rewrite_removes_stale_shards_named_in_another_case(tmp_path):
    """`data prepare` writing 1 shard where an earlier run (or a copy) left 00005.TAR: the readers list that name too
    (suffixes count in any case), so the cleanup removes it; the shard just written stays."""
    from mmray.data.prepare import remove_stale_shards

    for name in ("00000.tar", "00000_stats.json", "00005.TAR", "00005_STATS.json", "00006.tar", "notes.txt"):
        (tmp_path / name).write_text("x")
    remove_stale_shards(str(tmp_path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json", "notes.txt"]
