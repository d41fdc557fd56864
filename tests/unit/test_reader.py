"""mmray's shard reader and per-sample preprocessing: exact counts, and every bad sample counted by reason."""
import io
import logging
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmray.data.pipeline import (Preprocess, check_quality, decode_caption, decode_image, decode_meta, decode_pixels,
                                 pick_qa, BadDataError)
from mmray.data.reader import RAW_SCHEMA, _Blocks, iter_parquet, iter_tar, tar_members
from mmray.data.tokenizer import train_tokenizer, TextTokenizer


def _jpeg(colour=(200, 30, 30), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _rows(blocks) -> list[dict]:
    return pa.concat_tables(list(blocks)).to_pylist()


def test_tar_groups_members_into_blocks_of_rows():
    members = []
    for i in range(7):
        members += [(f"{i:09d}.jpg", _jpeg()), (f"{i:09d}.txt", f"caption {i}".encode()), (f"{i:09d}.json", b"{}")]
    blocks = list(iter_tar(io.BytesIO(_tar(members)), "s/00000.tar", rows_per_block=3))
    assert [b.num_rows for b in blocks] == [3, 3, 1]
    assert all(b.schema == RAW_SCHEMA for b in blocks)
    rows = _rows(blocks)
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(7)]
    assert rows[4]["caption"] == b"caption 4" and rows[4]["error"] == ""


def test_tar_members_without_their_pair_are_flagged():
    members = [("a.jpg", _jpeg()), ("a.txt", b"ok"), ("b.jpg", _jpeg()), ("c.txt", b"no image"), ("d.png", _jpeg())]
    rows = _rows(iter_tar(io.BytesIO(_tar(members)), "x.tar", 100))
    assert [(r["key"], r["error"]) for r in rows] == [
        ("a", ""), ("b", "missing_caption"), ("c", "missing_image"), ("d", "missing_caption")]


def test_truncated_tar_keeps_whole_samples_and_reports_the_break():
    members = []
    for i in range(5):
        members += [(f"{i}.jpg", _jpeg()), (f"{i}.txt", b"cap")]
    data = _tar(members)
    rows = _rows(iter_tar(io.BytesIO(data[: len(data) // 2]), "t.tar", 100))
    good = [r for r in rows if not r["error"]]
    assert 1 <= len(good) < 5
    assert rows[-1]["error"].startswith("truncated_shard") and rows[-1]["key"] == "t.tar#truncated"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_read_what_tarfile_reads(fmt):
    """mmray's own tar header parser gives exactly tarfile's regular members: long names (ustar prefix, GNU
    ././@LongLink, pax path), non-ASCII names, empty members and directories (skipped) included."""
    deep = "d" * 90 + "/" + "e" * 60 + "/000000001"
    names = ["000000000.jpg", "000000000.txt", f"{deep}.jpg", f"{deep}.txt", "café/000000002.jpg", "empty.txt"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("x" * 150 + ".json")  # longer than ustar's name field can hold even with its prefix
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_dir("a-directory"))
        for i, name in enumerate(names):
            data = b"" if name == "empty.txt" else bytes(range(256)) * (i + 1) + name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert [n for n, _ in expected] == names
    assert list(tar_members(_Blocks(io.BytesIO(data)))) == expected


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_tar_with_a_corrupt_header_reports_the_shard_instead_of_ending_silently():
    """tarfile ends an archive quietly at a bad header after the first; the reader counts it as a broken shard."""
    members = []
    for i in range(4):
        members += [(f"{i}.jpg", _jpeg()), (f"{i}.txt", b"cap")]
    data = bytearray(_tar(members))
    offsets = [o for o in range(0, len(data), 512) if data[o:o + 5] == b"2.jpg"]
    data[offsets[0] + 10] ^= 0xFF  # flip a name byte: the checksum no longer matches
    rows = _rows(iter_tar(io.BytesIO(bytes(data)), "c.tar", 100))
    # sample 1 may have had more members after the break, so like a cut-off sample it is not emitted
    assert [r["key"] for r in rows] == ["0", "c.tar#truncated"]
    assert rows[-1]["error"].startswith("truncated_shard: bad header checksum at byte")


def _noise_jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = (np.random.RandomState(seed).rand(128, 128, 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()  # ~21 KB: noise does not compress


def _compressed_tar(members: list[tuple[str, bytes]], codec: str) -> bytes:
    """A tar compressed as other tools write it: Python's tarfile (``w:gz``, ``w:bz2``: what webdataset's
    TarWriter does for ``.tar.gz``) and Arrow's zstd and LZ4 frame streams (the formats of the ``zstd`` and
    ``lz4`` commands)."""
    if codec in ("zstd", "lz4"):
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, codec) as out:
            out.write(_tar(members))
        return sink.getvalue().to_pybytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode={"gzip": "w:gz", "bz2": "w:bz2"}[codec]) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _samples(n: int) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in ((f"{i:04d}.jpg", _noise_jpeg(i)), (f"{i:04d}.txt", f"cap {i}".encode()))]


@pytest.mark.parametrize("codec", ["gzip", "bz2", "zstd", "lz4"])
def test_compressed_tars_read_the_same_samples_and_damage_is_a_truncated_shard(codec):
    members = _samples(80)  # 1.7 MB of tar: more than one bz2 block (900 KB), many reads of the stream
    plain = _rows(iter_tar(io.BytesIO(_tar(members)), "p.tar", 8))
    data = _compressed_tar(members, codec)
    assert _rows(iter_tar(io.BytesIO(data), "p.tar", 8, codec=codec)) == plain
    assert [r["key"] for r in plain] == [f"{i:04d}" for i in range(80)] and not any(r["error"] for r in plain)

    # Cut short: the samples before the damage are kept, whole (all but the member being read, or for bz2 its
    # 900 KB compression block), the break is a truncated shard that names the codec.
    rows = _rows(iter_tar(io.BytesIO(data[:len(data) * 3 // 4]), "p.tar", 8, codec=codec))
    assert rows[:-1] == plain[:len(rows) - 1] and len(rows) - 1 >= 30
    assert rows[-1]["key"] == "p.tar#truncated"
    assert rows[-1]["error"].startswith(f"truncated_shard: corrupt {codec} data after "), rows[-1]["error"]
    # Zero padding after the compressed data (some writers add it) is never read: the tar ended before it.
    assert _rows(iter_tar(io.BytesIO(data + bytes(1024)), "p.tar", 8, codec=codec)) == plain
    # A plain tar under a compressed name is the same: nothing is taken for samples.
    rows = _rows(iter_tar(io.BytesIO(_tar(members)), "n.tar.gz", 8, codec=codec))
    assert [r["key"] for r in rows] == ["n.tar.gz#truncated"] and f"corrupt {codec} data" in rows[0]["error"]


def test_corrupt_gzip_data_is_a_truncated_shard_but_a_failing_storage_read_is_raised():
    """Inside the compressed stream damage is bad data (counted): zlib's own error, or the tar's header checksum
    when what zlib inflates is garbage; the stream under it failing is storage's error, raised as itself (retried
    by Arrow and Ray Data, or fatal), never counted as a bad shard."""
    members = _samples(30)
    plain = _rows(iter_tar(io.BytesIO(_tar(members)), "z.tar.gz", 8))
    for fill in (0x00, 0xFF):
        data = bytearray(_compressed_tar(members, "gzip"))
        data[len(data) // 2:len(data) // 2 + 64] = bytes([fill]) * 64
        rows = _rows(iter_tar(io.BytesIO(bytes(data)), "z.tar.gz", 8, codec="gzip"))
        assert rows[-1]["key"] == "z.tar.gz#truncated" and rows[-1]["error"].startswith("truncated_shard: ")
        assert rows[:-1] == plain[:len(rows) - 1] and len(rows) - 1 >= 5, rows[-1]["error"]

    class Dropped(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 50_000:
                raise OSError("AWS Error NETWORK_CONNECTION: connection reset")
            return super().read(min(n, 20_000) if n and n > 0 else 20_000)

    with pytest.raises(OSError, match="^AWS Error NETWORK_CONNECTION: connection reset$"):
        list(iter_tar(Dropped(_compressed_tar(members, "gzip")), "s.tar.gz", 8, codec="gzip"))


def test_members_apart_from_their_sample_are_counted_as_such():
    """WebDataset keeps a sample's members adjacent; a tar written in directory order (`tar cf x.tar dir/`) splits
    samples. Each later part is counted as members_not_adjacent (the reason names the fix), never joined silently."""
    members = [("a.jpg", _jpeg()), ("b.jpg", _jpeg()), ("b.txt", b"bee"), ("a.txt", b"ay"), ("c.jpg", _jpeg()),
               ("c.txt", b"see")]
    rows = _rows(iter_tar(io.BytesIO(_tar(members)), "d.tar", 100))
    assert [(r["key"], r["error"]) for r in rows] == [
        ("a", "missing_caption"), ("b", ""), ("a", "members_not_adjacent"), ("c", "")]


def test_a_cut_keeps_every_sample_read_whole_before_it(caplog):
    """Cut inside the next sample's member, the sample before the damage was read whole and is kept (as tar and
    webdataset read it), compressed or not; cut between two members, inside a header or inside one of its own
    members, it may have lost a member (its metadata, its caption) and is counted with the damage instead."""
    import gzip

    members = [("000.jpg", _jpeg()), ("000.txt", b"zero"), ("000.json", b"{}"), ("001.jpg", _jpeg((0, 0, 200))),
               ("001.txt", b"one"), ("001.json", b'{"label": "x"}')]
    data = _tar(members)
    cuts = {"in 001.jpg": data.index(members[3][1]) + 100,
            "before 001.json": data.index(b"one") + tarfile.BLOCKSIZE,  # a cut between two of its members
            "no end blocks": data.index(b'{"label"') + tarfile.BLOCKSIZE,  # every member whole, no end blocks
            "in 000.txt header": data.index(b"000.txt") + 10,
            "in 001.txt": data.index(b"one") + 1}
    got = {what: [(r["key"], r["error"].split(":")[0]) for r in _rows(iter_tar(io.BytesIO(data[:at]), "t.tar", 8))]
           for what, at in cuts.items()}
    kept = [("000", ""), ("t.tar#truncated", "truncated_shard")]
    assert got == {"in 001.jpg": kept, "before 001.json": kept, "no end blocks": kept,
                   "in 000.txt header": [("t.tar#truncated", "truncated_shard")], "in 001.txt": kept}
    # A gzip-compressed tar cut inside 001.jpg's compressed data keeps 000 too (noise: a JPEG gzip cannot shrink).
    noise = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)).save(noise, "JPEG")
    packed = gzip.compress(_tar(members[:3] + [("001.jpg", noise.getvalue())] + members[4:]), mtime=0)
    for at in range(len(packed) // 2, len(packed), 50):
        rows = _rows(iter_tar(io.BytesIO(packed[:at]), "t.tar.gz", 8, codec="gzip"))
        if rows[-1]["error"].startswith("truncated_shard") and "inside member 001.jpg" in rows[-1]["error"]:
            assert [r["key"] for r in rows] == ["000", "t.tar.gz#truncated"]
            break
    else:
        raise AssertionError("no cut inside 001.jpg's compressed data found")
    # With the shard's count, exactly the samples lost.
    rows = _rows(iter_tar(io.BytesIO(data[:cuts["in 001.jpg"]]), "t.tar", 8, expected=lambda: 2))
    assert [(r["key"], r["error"].split(":")[0]) for r in rows] == kept
    with caplog.at_level(logging.WARNING, logger="mmray"):
        rows = _rows(iter_tar(io.BytesIO(data[:cuts["no end blocks"]]), "t.tar", 8, expected=lambda: 1))
    assert [r["key"] for r in rows] == ["000"] and "without its end-of-archive blocks" in caplog.text


def test_latin1_names_links_and_duplicate_members_are_samples_or_counted():
    """Member names that are not UTF-8 (GNU tar in a Latin-1 locale) give escaped keys instead of failing the read;
    a hard or symbolic link (no data; not followed) and two members of one extension make the sample bad, by name,
    never a wrong or silently lost sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        def add(name, data=None, link=None):
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        add("caf\u00e9.jpg", _jpeg())
        add("caf\u00e9.txt", b"coffee")
        add("l.jpg", link=(tarfile.LNKTYPE, "caf\u00e9.jpg"))
        add("l.txt", b"a link")
        add("s.jpg", link=(tarfile.SYMTYPE, "caf\u00e9.jpg"))
        add("s.txt", link=(tarfile.SYMTYPE, "caf\u00e9.txt"))
        add("d.jpg", _jpeg((0, 0, 255)))
        add("d.jpg", _jpeg((0, 255, 0)))
        add("d.txt", b"two images")
        add("ok.jpg", _jpeg())
        add("ok.txt", b"fine")
    rows = _rows(iter_tar(io.BytesIO(buf.getvalue()), "x.tar", 100))
    assert [(r["key"], r["error"]) for r in rows] == [
        ("caf\\xe9", ""), ("l", "linked_member"), ("s", "linked_member"), ("d", "duplicate_member"), ("ok", "")]
    assert rows[0]["caption"] == b"coffee"


def test_a_cut_tar_counts_every_sample_its_stats_say_it_lost():
    """With the shard's sample count (its _stats.json), the rest of a cut tar is that many bad samples, so that the
    counts and data.max_bad_fraction see them; without it, one (how many the rest held is unknown)."""
    data = _tar(_samples(30))
    asked = []
    rows = _rows(iter_tar(io.BytesIO(data[:len(data) // 3]), "t.tar", 8, expected=lambda: asked.append(1) or 30))
    good = [r for r in rows if not r["error"]]
    lost = rows[len(good):]
    assert [r["key"] for r in good] == [f"{i:04d}" for i in range(len(good))] and 5 <= len(good) < 15
    assert len(good) + len(lost) == 30 and asked == [1]
    # distinct keys, as samples have: mixing weights (chosen by key) weigh them one by one
    assert [r["key"] for r in lost] == ["t.tar#truncated"] + [f"t.tar#truncated/{i}" for i in range(1, len(lost))]
    (error,) = {r["error"] for r in lost}
    assert error.startswith(f"truncated_shard: archive ends at byte {len(data) // 3} inside member ")
    assert error.endswith(f"; {len(lost)} of its 30 samples (_stats.json) not read")
    rows = _rows(iter_tar(io.BytesIO(data[:len(data) // 3]), "t.tar", 8))
    assert len(rows) == len(good) + 1 and rows[-1]["error"].startswith("truncated_shard: archive ends at byte")
    # the count is looked up only for a damaged shard
    assert len(_rows(iter_tar(io.BytesIO(data), "t.tar", 8, expected=lambda: asked.append(1) or 30))) == 30
    assert asked == [1]


def test_the_samples_a_break_lost_are_weighed_one_by_one_and_shown_as_one_example():
    from mmray.data.mixing import Resample
    from mmray.data.pipeline import DataQuality

    data = _tar(_samples(30))
    rows = pa.concat_tables(iter_tar(io.BytesIO(data[:len(data) // 10]), "/d/t.tar", 64, expected=lambda: 1000))
    lost = rows.filter(pa.compute.not_equal(rows["error"], ""))
    assert lost.num_rows > 990
    halved = Resample({"/d/t.tar": 0.5}, seed=3)({c: lost[c].to_numpy(zero_copy_only=False) for c in ("key", "shard")})
    assert abs(len(halved["key"]) - lost.num_rows / 2) < 4 * 16  # binomial(~995, 0.5): sd ~16
    quality = DataQuality()
    quality.add(0, {"truncated_shard": [f"/d/t.tar:{k}" for k in halved["key"]] + ["/d/u.tar:/d/u.tar#truncated~1"]})
    assert quality.snapshot()["bad"] == {"truncated_shard": len(halved["key"]) + 1}
    assert quality.snapshot()["bad_examples"] == {"truncated_shard": ["/d/t.tar:/d/t.tar#truncated",
                                                                      "/d/u.tar:/d/u.tar#truncated"]}


def _parquet_with_a_bad_row_group(table: pa.Table, rows_per_group: int, bad_group: int) -> bytes:
    """``table`` as Parquet whose ``bad_group``-th row group has its image column's page header overwritten."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rows_per_group)
    data = bytearray(buf.getvalue())
    column = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(bad_group).column(
        table.column_names.index("jpg"))
    data[column.data_page_offset:column.data_page_offset + 16] = b"\xff" * 16
    return bytes(data)


def test_an_unreadable_parquet_row_group_is_each_of_its_rows_counted():
    table = pa.table({"key": [f"k{i:02d}" for i in range(12)], "jpg": [_noise_jpeg(i) for i in range(12)],
                      "txt": [f"cap {i}" for i in range(12)]})
    rows = _rows(iter_parquet(_parquet_with_a_bad_row_group(table, 4, 1), "p.parquet", 5))
    assert [(r["key"], r["error"].split(":")[0]) for r in rows] == (
        [(f"k{i:02d}", "") for i in range(4)]
        + [("p.parquet#rowgroup1", "unreadable_row_group")]
        + [(f"p.parquet#rowgroup1/{i}", "unreadable_row_group") for i in (1, 2, 3)]
        + [(f"k{i:02d}", "") for i in range(8, 12)])
    assert "Deserializing page header failed" in rows[4]["error"]
    assert [r["image"] for r in rows[8:]] == table.column("jpg").to_pylist()[8:]

    # img2dataset's Parquet lists the URLs it failed to fetch too (status, no image): the rows of a group are not
    # all samples, so what the group held comes from the file's _stats.json, or counts one without it.
    status = ["success" if i % 3 else "failed_to_download" for i in range(12)]
    fetched = table.set_column(1, "jpg", pa.array([None if st != "success" else j for st, j in
                                                   zip(status, table.column("jpg").to_pylist())], pa.binary()))
    fetched = fetched.append_column("status", pa.array(status)).append_column(
        "error_message", pa.array([None if st == "success" else "HTTP Error 404" for st in status]))
    data = _parquet_with_a_bad_row_group(fetched, 4, 1)
    rows = _rows(iter_parquet(data, "i.parquet", 5, expected=lambda: 8))  # 8 successes of 12 URLs
    assert [r["key"] for r in rows if not r["error"]] == ["k01", "k02", "k08", "k10", "k11"]
    lost = [r for r in rows if r["error"]]  # k04, k05 and k07 were in the unreadable group
    assert [r["key"] for r in lost] == ["i.parquet#rowgroup1", "i.parquet#rowgroup1/1", "i.parquet#rowgroup1/2"]
    assert lost[0]["error"].endswith("; 3 of its 8 samples (_stats.json) not read")
    assert len([r for r in _rows(iter_parquet(data, "i.parquet", 5)) if r["error"]]) == 1


def test_parquet_rows_and_hf_style_image_structs(tmp_path):
    table = pa.table({"key": ["k0", "k1"], "jpg": [_jpeg(), None], "txt": ["red", "blue"]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    rows = _rows(iter_parquet(buf.getvalue(), "p.parquet", 10, "jpg", "txt", "key"))
    assert [(r["key"], r["error"]) for r in rows] == [("k0", ""), ("k1", "missing_image")]

    structs = pa.table({"image": [{"bytes": _jpeg(), "path": "a.jpg"}], "text": ["x"]})
    buf = io.BytesIO()
    pq.write_table(structs, buf)
    rows = _rows(iter_parquet(buf.getvalue(), "q.parquet", 10, "image", "text", "key"))
    assert rows[0]["key"] == "0" and rows[0]["image"][:2] == b"\xff\xd8"
    # Hugging Face datasets' own column names (an `image` struct, a `text` caption) are found with `auto` too.
    rows = _rows(iter_parquet(buf.getvalue(), "q.parquet", 10))
    assert rows[0]["image"][:2] == b"\xff\xd8" and rows[0]["caption"] == b"x"


def test_only_img2dataset_failed_rows_are_skipped_whatever_a_status_column_holds():
    """img2dataset's Parquet lists the URLs it failed to fetch (status failed_to_download / failed_to_resize, no
    image): not samples. Another tool's `status` column (HTTP codes, review states) drops nothing: every row is read,
    and a row without its image is counted as missing_image."""
    rows = _rows(iter_parquet(_parquet(pa.table({
        "jpg": [_jpeg(), None, None, _jpeg()], "txt": ["a", "b", "c", "d"],
        "status": ["success", "failed_to_download", "failed_to_resize", "success"],
        "error_message": [None, "HTTP Error 404", "cannot identify image", None]})), "i2d.parquet", 10))
    assert [(r["key"], r["error"]) for r in rows] == [("0", ""), ("3", "")]
    # Not img2dataset's file (its status comes with an error_message column): every row is a sample.
    for status in ([200, 404, 200], ["approved", "rejected", "failed_to_download"], [b"x", b"y", b"z"]):
        rows = _rows(iter_parquet(_parquet(pa.table({"jpg": [_jpeg(), _jpeg(), None], "txt": ["a", "b", "c"],
                                                      "status": status})), "other.parquet", 10))
        assert [(r["key"], r["error"]) for r in rows] == [("0", ""), ("1", ""), ("2", "missing_image")], status
    # ... and an unreadable row group of such a file counts each of its rows
    other = pa.table({"jpg": [_jpeg()] * 8, "txt": ["x"] * 8, "status": ["approved"] * 8})
    rows = _rows(iter_parquet(_parquet_with_a_bad_row_group(other, 4, 1), "other.parquet", 10))
    assert len(rows) == 8 and sum(r["error"].startswith("unreadable_row_group") for r in rows) == 4


def test_tar_of_a_folder_skips_what_is_not_a_sample_member(tmp_path):
    """GNU tar of a folder (sorted, as WebDataset needs) holds `./`, a README, macOS's .DS_Store and `._x.jpg`
    files: none is a KEY.EXT member, so none is a sample (webdataset's own reader skips them too); the samples are
    read whole, without a bad sample."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    folder = tmp_path / "shard"
    (folder / "sub").mkdir(parents=True)
    for key in ("000000000", "000000001", "sub/000000002"):
        (folder / f"{key}.jpg").write_bytes(_jpeg())
        (folder / f"{key}.txt").write_text(f"caption {key}")
    (folder / "README").write_text("made by hand")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._000000000.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (folder / "sub" / ".hidden").write_text("x")
    shard = tmp_path / "00000.tar"
    subprocess.run(["tar", "--sort=name", "-cf", str(shard), "-C", str(folder), "."], check=True)
    with open(shard, "rb") as f:
        rows = _rows(iter_tar(f, "00000.tar", 100))
    assert [(r["key"], r["error"], r["caption"]) for r in rows] == [
        ("./000000000", "", b"caption 000000000"), ("./000000001", "", b"caption 000000001"),
        ("./sub/000000002", "", b"caption sub/000000002")]


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_parquet_with_nested_metadata_and_caption_lists_as_hugging_face_writes_them():
    """Hugging Face datasets store a WebDataset's `json` member as a struct column, and Flickr30k/COCO-style sets
    keep several captions per image in a list column: the metadata reads back as the JSON object, and a list of
    captions gives its first non-empty one (an empty list: a missing caption)."""
    meta = pa.array([{"qa": [{"question": "how many?", "answer": 3}], "width": 40}, None,
                     {"qa": [], "width": 8}])
    table = pa.table({"image": [{"bytes": _jpeg(), "path": None}] * 3, "caption": [["", "a dog", "a pet"], [], None],
                      "json": meta, "key": ["a", "b", "c"]})
    rows = _rows(iter_parquet(_parquet(table), "hf.parquet", 10))
    assert [(r["key"], r["caption"], r["error"]) for r in rows] == [
        ("a", b"a dog", ""), ("b", None, "missing_caption"), ("c", None, "missing_caption")]
    import json

    assert json.loads(rows[0]["meta"]) == {"qa": [{"question": "how many?", "answer": 3}], "width": 40}
    assert rows[1]["meta"] is None and json.loads(rows[2]["meta"]) == {"qa": [], "width": 8}
    # A map column (pandas dicts written with an explicit map type) reads back as the same object.
    maps = pa.table({"jpg": [_jpeg()], "txt": ["x"], "json": pa.array([[("label", "cat")]],
                                                                       pa.map_(pa.string(), pa.string()))})
    assert json.loads(_rows(iter_parquet(_parquet(maps), "m.parquet", 10))[0]["meta"]) == {"label": "cat"}


def test_parquet_dictionary_encoded_columns_read_as_their_values():
    """pandas writes a Categorical column dictionary-encoded: captions (and images) stored so are still text."""
    captions = pa.array(["a cat", "a dog", "a cat"]).dictionary_encode()
    images = pa.array([_jpeg(), _jpeg(), None], pa.binary()).dictionary_encode()
    table = pa.table({"image": images, "caption": captions, "key": ["a", "b", "c"]})
    assert pa.types.is_dictionary(pq.read_table(io.BytesIO(_parquet(table))).schema.field("caption").type)
    rows = _rows(iter_parquet(_parquet(table), "cat.parquet", 10))
    assert [(r["key"], r["caption"], r["error"]) for r in rows] == [
        ("a", b"a cat", ""), ("b", b"a dog", ""), ("c", b"a cat", "missing_image")]
    assert rows[0]["image"] == _jpeg()


def test_parquet_columns_of_the_wrong_type_are_named():
    numbers = pa.table({"jpg": [_jpeg()], "txt": [7]})
    with pytest.raises(ValueError, match=r"n.parquet: Parquet caption column 'txt' holds int64, not text.*"
                                         r"set data.caption_column"):
        list(iter_parquet(_parquet(numbers), "n.parquet", 10))
    pixels = pa.table({"jpg": [[1, 2, 3]], "txt": ["x"]})
    with pytest.raises(ValueError, match=r"Parquet image column 'jpg' holds list<element: int64>, not encoded image"):
        list(iter_parquet(_parquet(pixels), "i.parquet", 10))
    paths = pa.table({"image": ["photos/0001.jpg"], "text": ["x"]})  # a Hugging Face image column of paths
    with pytest.raises(ValueError, match=r"'image' holds string, not encoded image bytes .*a column of paths or URLs"):
        list(iter_parquet(_parquet(paths), "s.parquet", 10))


def test_parquet_without_the_columns_names_them():
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1]}), buf)
    with pytest.raises(ValueError, match=r"no image column \('jpg'\); it has \['a'\]. Set data.image_column"):
        list(iter_parquet(buf.getvalue(), "p.parquet", 10, "jpg", "txt", "key"))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_image"),
    (b"not an image at all", "corrupt_image"),
    (_jpeg()[:100], "corrupt_image"),
])
def test_decode_image_reasons(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_image(data, 32)


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, format="PNG")  # small file, 100 M pixels
    with pytest.raises(ValueError, match="image_too_large"):
        decode_image(buf.getvalue(), 32)


def test_decode_image_resizes_and_normalises():
    arr = decode_image(_jpeg((255, 0, 0), (100, 60)), 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert arr[0].mean() > 0.9 and arr[1].mean() < -0.8


def test_decode_turns_photos_upright_keeps_bad_exif_and_scales_16_bit_greyscale():
    # Stored sideways (100 x 50, the left half white) with EXIF orientation 6: shown rotated 90 degrees clockwise,
    # so the white half is on top, as a viewer (and the caption's author) sees it.
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 50, 50))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    px = decode_pixels(buf.getvalue(), 32)
    assert px[:12].min() > 240 and px[-12:].max() < 15
    # The same orientation in XMP (tiff:Orientation), which Pillow reads when there is no EXIF block.
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           b'</x:xmpmeta>')
    buf = io.BytesIO()
    img.save(buf, format="JPEG", xmp=xmp)
    px = decode_pixels(buf.getvalue(), 32)
    assert px[:12].min() > 240 and px[-12:].max() < 15
    # An EXIF block Pillow cannot parse leaves the image as stored: the pixels are fine, so it is not dropped.
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="JPEG", exif=b"Exif\x00\x00garbage-garbage")
    assert np.abs(decode_pixels(buf.getvalue(), 32).astype(int) - (10, 200, 30)).max() <= 3
    # A 16-bit greyscale PNG at 40000 / 65535 is grey 156 (40000 >> 8), not clipped to white.
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(buf, format="PNG")
    assert np.array_equal(decode_pixels(buf.getvalue(), 32), np.full((32, 32, 3), 156, np.uint8))


def _photo_jpeg(side: int, mode: str = "RGB") -> bytes:
    """A photograph-like JPEG (smooth gradients plus noise, so DCT scaling and resizing differ measurably)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 4, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _pillow_reference(data: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC))


def test_jpegs_decode_at_the_dct_scale_of_the_model_size(monkeypatch):
    # 512 px -> 224: decoded at 1/2 (256 px) and resized, the same pixels, bit for bit, as Pillow's draft mode.
    big = _photo_jpeg(512)
    assert np.array_equal(decode_pixels(big, 224), _pillow_reference(big, 224))
    # CMYK goes through Pillow (Adobe's inverted CMYK): the same pixels as Pillow gives.
    cmyk = _photo_jpeg(64, "CMYK")
    assert np.array_equal(decode_pixels(cmyk, 32), _pillow_reference(cmyk, 32))
    # 256 px (img2dataset's default) -> 224: decoded at 7/8 straight to 224 px; no resize runs. Close to a full
    # decode resized by Pillow, not equal (a different, DCT-domain, filter).
    small = _photo_jpeg(256)
    reference = _pillow_reference(small, 224)
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized a JPEG that DCT scaling fits"))
        pixels = decode_pixels(small, 224)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - reference).mean() < 3
    # Into a row of a block: the same pixels, whether decoded in place (7/8), resized (1/2), upscaled from an image
    # smaller than the model size, or through Pillow (CMYK, PNG).
    png = io.BytesIO()
    Image.new("RGB", (50, 70), (9, 99, 199)).save(png, format="PNG")
    block = np.zeros((5, 224, 224, 3), np.uint8)
    for row, data in enumerate([small, big, _photo_jpeg(100), cmyk, png.getvalue()]):
        assert np.shares_memory(decode_pixels(data, 224, out=block[row]), block[row])
        assert np.array_equal(block[row], decode_pixels(data, 224)), row
    # A truncated JPEG is still corrupt; a header claiming more pixels than allowed is refused before decoding.
    with pytest.raises(ValueError, match="corrupt_image"):
        decode_pixels(big[:len(big) // 2], 224)
    sof = small.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    bomb = small[:sof + 5] + (9000).to_bytes(2, "big") * 2 + small[sof + 9:]
    with pytest.raises(ValueError, match="image_too_large"):
        decode_pixels(bomb, 224)


def test_model_normalises_pipeline_pixels_bit_for_bit_like_decode_image():
    """Batches carry uint8 pixels; the model's float input must be exactly what decode_image gives, for every value."""
    import torch

    from mmray.models.encoders import normalise_pixels

    data = _jpeg((255, 0, 0), (100, 60))
    pixels = decode_pixels(data, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8  # channels last, as decoded
    assert np.array_equal(normalise_pixels(torch.from_numpy(pixels[None].copy()))[0].numpy(), decode_image(data, 32))
    every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1) * np.ones(3, np.uint8)  # (1, 16, 16, 3)
    every[..., 1] = 255 - every[..., 1]  # the channels differ, so a wrong transpose cannot pass
    via_torch = normalise_pixels(torch.from_numpy(every)).numpy()
    assert via_torch.shape == (1, 3, 16, 16) and via_torch.dtype == np.float32
    assert np.array_equal(via_torch, every.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    assert (via_torch[0, 0, 0, 0], via_torch[0, 0, 15, 15], via_torch[0, 1, 0, 0]) == (-1.0, 1.0, 1.0)
    floats = torch.zeros(2, 3)
    assert normalise_pixels(floats) is floats  # float images are taken as already normalised


@pytest.mark.parametrize("data, reason", [(None, "missing_caption"), (b"  ", "empty_caption"),
                                          (b"\xff\xfe bad", "non_utf8_caption")])
def test_decode_caption_reasons(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_caption(data)


def test_a_utf8_byte_order_mark_is_not_caption_text():
    assert decode_caption("\ufeffa red circle\n".encode("utf-8")) == "a red circle"
    assert decode_meta("\ufeff{\"label\": \"cat\"}".encode("utf-8")) == {"label": "cat"}


@pytest.mark.parametrize("answer, text", [(3, "3"), (0, "0"), (2.0, "2"), (2.5, "2.5"), (True, "yes"), (False, "no"),
                                          (" red ", "red"), ("", None), (None, None), ([1], None),
                                          (float("nan"), None)])
def test_qa_answers_that_are_numbers_or_booleans_are_used_as_text(answer, text):
    """VQA-style JSON often stores counts as numbers (and yes/no as booleans): they are answers like any other;
    an answer that is empty or not a scalar leaves the pair unusable."""
    qa = pick_qa("k", {"qa": [{"question": "how many circles?", "answer": answer, "type": "count"}]})
    assert qa == (None if text is None else {"question": "how many circles?", "answer": text, "type": "count"})


def test_qa_from_an_index_rows_question_and_answer_fields():
    """A CSV / JSONL index with question and answer columns keeps them as the sample's top-level metadata: that is
    one QA pair, for training, the tokenizer and `mmray generate --task vqa`; a `qa` list takes precedence."""
    from mmray.data.tokenizer import sample_texts

    row = {"question": "how many circles?", "answer": "2", "source": "x.jpg"}
    assert pick_qa("k", row) == {"question": "how many circles?", "answer": "2", "type": ""}
    assert sample_texts("two circles", row) == ["two circles", "how many circles? 2"]
    listed = {**row, "qa": [{"question": "what colour?", "answer": "red"}]}
    assert pick_qa("k", listed)["question"] == "what colour?"
    assert pick_qa("k", {"answer": "2"}) is None and sample_texts("c", {"answer": "2"}) == ["c"]


def test_preprocess_tokenizes_a_numeric_answer_instead_of_failing_the_block():
    import json

    tok = TextTokenizer(train_tokenizer(["how many circles? 3", "a red circle"], vocab_size=128))
    meta = json.dumps({"qa": [{"question": "how many circles?", "answer": 3}]}).encode()
    batch = {"key": np.array(["0", "1"], dtype=object), "shard": np.array(["s"] * 2, dtype=object),
             "image": np.array([_jpeg(), _jpeg()], dtype=object),
             "caption": np.array([b"a red circle", b"a red circle"], dtype=object),
             "meta": np.array([meta, None], dtype=object), "error": np.array(["", ""], dtype=object)}
    out = Preprocess(tok.to_str(), 32, 8)(batch)
    assert list(out["key"]) == ["0", "1"] and list(out["answer"]) == ["3", ""]
    assert tok.decode(out["answer_ids"][0].tolist()) == "3"


def test_preprocess_drops_bad_samples_per_sample_not_per_block():
    tok = TextTokenizer(train_tokenizer(["a red circle", "a blue square"], vocab_size=128))
    batch = {"key": np.array(["0", "1", "2", "3"], dtype=object), "shard": np.array(["s"] * 4, dtype=object),
             "image": np.array([_jpeg(), b"junk", _jpeg(), None], dtype=object),
             "caption": np.array([b"a red circle", b"x", b"\xff", b"y"], dtype=object),
             "error": np.array(["", "", "", "missing_image"], dtype=object)}
    out = Preprocess(tok.to_str(), 32, 8)(batch)
    assert list(out["key"]) == ["0"] and out["image"].shape == (1, 32, 32, 3) and out["text_ids"].shape == (1, 8)
    assert out["image"].dtype == np.uint8 and np.array_equal(out["image"][0], decode_pixels(_jpeg(), 32))
    assert list(out["caption"]) == ["a red circle"]


def test_preprocess_for_generation_keeps_samples_without_a_caption():
    tok = TextTokenizer(train_tokenizer(["a red circle"], vocab_size=128))
    batch = {"key": np.array(["0", "1", "2", "3"], dtype=object), "shard": np.array(["s"] * 4, dtype=object),
             "image": np.array([_jpeg(), _jpeg(), _jpeg(), b"junk"], dtype=object),
             "caption": np.array([None, b"  ", b"\xff", b"x"], dtype=object),
             "error": np.array(["missing_caption", "", "", ""], dtype=object)}
    out = Preprocess(tok.to_str(), 32, 8, captions_required=False)(batch)
    assert list(out["key"]) == ["0", "1", "2"] and list(out["caption"]) == ["", "", ""]  # junk: still bad
    assert list(Preprocess(tok.to_str(), 32, 8)(batch)["key"]) == []


def test_quality_limit_names_reasons_and_examples():
    check_quality({"good": 99, "bad": {"corrupt_image": 1}, "bad_examples": {}}, 0.01)
    with pytest.raises(BadDataError, match=r"2 of 100 samples \(2.0%\).*corrupt_image.*s:7"):
        check_quality({"good": 98, "bad": {"corrupt_image": 2}, "bad_examples": {"corrupt_image": ["s:7"]}}, 0.01)
    # Reasons that usually come from how the shards were written or are read say what to check.
    with pytest.raises(BadDataError, match=r"What to check: missing_caption: .*data\.caption_extension.*"
                                           r"; members_not_adjacent: .*tar --sort=name"):
        check_quality({"good": 0, "bad": {"missing_caption": 5, "members_not_adjacent": 5, "corrupt_image": 1},
                       "bad_examples": {}}, 0.01)


@pytest.mark.parametrize("size, rows", [(32, 256), (64, 256), (160, 256), (224, 128), (384, 32), (4096, 16)])
def test_reader_blocks_of_large_images_stay_under_the_mmap_threshold(size, rows):
    """A reader block's pixels (rows x S x S x 3 bytes) stay within 24 MiB, under glibc's 32 MiB mmap ceiling, as a
    power of two of at most 256 rows and at least 16."""
    from mmray.data.pipeline import BLOCK_PIXEL_BYTES, block_rows

    assert block_rows(size) == rows
    assert rows == 16 or rows * size * size * 3 <= BLOCK_PIXEL_BYTES < 2 * rows * size * size * 3 or rows == 256


def test_binary_columns_are_built_whole_and_equal_pyarrows():
    from mmray.data.reader import binary_array

    values = [b"\xff\xd8" + bytes(range(256)) * 40, None, b"", b"caption", None]
    column = binary_array(values)
    assert column.equals(pa.array(values, pa.binary())) and column.null_count == 2
    assert column.to_pylist() == values
    assert binary_array([b"x", b"yz"]).null_count == 0 and binary_array([]).equals(pa.array([], pa.binary()))
    # Values that are not bytes (a Parquet string column named as the image column) are left to pa.array, which
    # encodes them (each then fails to decode, as corrupt_image, instead of failing the read).
    assert pa.table({"image": binary_array(["é", None])}, schema=pa.schema([("image", pa.binary())])).column(
        "image").to_pylist() == ["é".encode(), None]


@pytest.mark.parametrize("size, rows", [(32, 43690), (224, 891), (512, 170), (8192, 1)])
def test_a_preprocess_call_decodes_at_most_128_mib_of_pixels(size, rows):
    from mmray.data.pipeline import DECODED_BATCH_BYTES, decoded_rows

    assert decoded_rows(size) == rows
    assert rows == 1 or rows * size * size * 3 <= DECODED_BATCH_BYTES < (rows + 1) * size * size * 3


def test_in_chunks_decodes_a_large_batch_in_pieces_in_order():
    from mmray.data.pipeline import InChunks

    calls = []

    def pre(batch):
        calls.append(len(batch["key"]))
        return {"key": batch["key"] * 2}

    batch = {"key": np.arange(250), "image": np.array([b"x"] * 250, dtype=object)}
    out = list(InChunks(pre, 100)(batch))
    assert calls == [100, 100, 50]
    assert np.concatenate([o["key"] for o in out]).tolist() == (np.arange(250) * 2).tolist()
    calls.clear()
    assert [o["key"].tolist() for o in InChunks(pre, 100)({"key": np.arange(0)})] == [[]] and calls == [0]

