"""The data position (no Ray): what each rank records and saves, the union restored over any number of ranks, the
repeats counted, and the per-shard filter the datasource applies to raw blocks."""
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from mmray.data.position import (SHARD_ROWS, ConsumedSamples, by_shard, consumed_name, drop_consumed, epoch_seed,
                                 key_digest, read_consumed, read_shard_rows, shard_signature, trained_on_whole,
                                 window_order)


def _ids(table: pa.Table) -> Counter:
    return Counter(zip(table.column("shard").to_pylist(), table.column("key").to_pylist()))


def _obj(values) -> np.ndarray:
    return np.array(values, dtype=object)  # as Ray Data's numpy batches hold strings


def test_two_ranks_saved_restore_as_one_set_on_one_rank_and_back_on_two(tmp_path):
    ckpt = tmp_path / "ckpt"
    r0, r1 = ConsumedSamples(0), ConsumedSamples(1)
    r0.add(_obj(["a", "a"]), _obj(["1", "2"]))
    r1.add(_obj(["b", "a"]), _obj(["1", "3"]))
    r0.write(ckpt), r1.write(ckpt)
    assert sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*.parquet")) == [consumed_name(0),
                                                                                       consumed_name(1)]

    # Resumed on one worker: the union of both ranks' files; its own samples follow; nothing was repeated.
    solo = ConsumedSamples(0)
    solo.restore(ckpt)
    assert _ids(solo.before) == Counter({("a", "1"): 1, ("a", "2"): 1, ("b", "1"): 1, ("a", "3"): 1})
    solo.add(_obj(["b"]), _obj(["2"]))
    assert solo.repeated == 0
    solo.write(tmp_path / "next")
    assert _ids(read_consumed(tmp_path / "next")) == _ids(solo.before) + Counter({("b", "2"): 1})

    # Back on two workers: rank 1 trains on a sample the checkpoint already holds (a repeat) and one twice.
    r0, r1 = ConsumedSamples(0), ConsumedSamples(1)
    r0.restore(tmp_path / "next"), r1.restore(tmp_path / "next")
    r1.add(_obj(["a", "c", "c"]), _obj(["2", "9", "9"]))
    assert (r0.repeated, r1.repeated) == (0, 2)
    r0.write(tmp_path / "third"), r1.write(tmp_path / "third")
    saved = _ids(read_consumed(tmp_path / "third"))  # rank 0 holds the restored set once, rank 1 what it trained on
    assert saved[("a", "2")] == 2 and saved[("c", "9")] == 2 and sum(saved.values()) == 5 + 3

    # A new epoch starts from nothing; the repeats of this attempt stay counted.
    r1.new_epoch()
    assert r1.table().num_rows == 0 and r1.before.num_rows == 0 and r1.repeated == 2
    r1.add(_obj(["a"]), _obj(["2"]))
    assert r1.repeated == 2


def test_a_checkpoint_without_position_files_restores_an_empty_set(tmp_path):
    samples = ConsumedSamples(0)
    samples.restore(tmp_path)
    assert samples.before.num_rows == 0 and read_consumed(tmp_path).num_rows == 0


def test_raw_blocks_lose_exactly_their_shards_consumed_keys():
    consumed = pa.table({"shard": ["s0", "s1", "s0"], "key": ["k1", "k1", "k3"]})
    excluded = by_shard(consumed)
    assert {s: sorted(k.to_pylist()) for s, k in excluded.items()} == {"s0": ["k1", "k3"], "s1": ["k1"]}
    block = pa.table({"key": ["k0", "k1", "k2", "k3"], "shard": ["s0"] * 4, "image": [b"x"] * 4})
    assert drop_consumed(block, excluded["s0"]).column("key").to_pylist() == ["k0", "k2"]
    assert drop_consumed(block, excluded.get("s9")).num_rows == 4  # a shard with nothing consumed
    assert by_shard(consumed.slice(0, 0)) == {}


def test_a_shard_is_trained_on_whole_only_when_its_consumed_keys_are_the_keys_it_gave_unchanged():
    consumed = pa.table({"shard": ["s0", "s0", "s1", "s1", "s1", "s2", "s2", "gone"],
                         "key": ["k1", "k2", "k1", "k1", "k2", "k1", "k2", "k1"]})  # s1's k1 twice (two ranks' files)
    excluded = by_shard(consumed)
    now = {s: shard_signature(100, 7) for s in ("s0", "s1", "s2")}  # the data set's shards, as they are now
    both = key_digest(["k2", "k1"])
    # s0 gave k1, k2 (both trained on); s1 gave 3 rows (one not yet); s2's rows are unknown (not read to its end);
    # "gone" is no longer in the data set.
    rows = {"s0": [2, now["s0"], both], "s1": [3, now["s1"], key_digest(["k1", "k2", "k3"])],
            "gone": [1, shard_signature(7, 1), key_digest(["k1"])]}
    assert trained_on_whole(excluded, rows, now) == {"s0"}
    assert trained_on_whole(excluded, {s: [2, now[s], both] for s in now}, now) == {"s0", "s1", "s2"}
    assert trained_on_whole(excluded, {}, now) == set() and trained_on_whole({}, rows, now) == set()
    # Rewritten since (another size or time), or mixed with another weight or seed: read again.
    for changed in (shard_signature(101, 7), shard_signature(100, 8), shard_signature(100, 7, 2.0, 0)):
        assert trained_on_whole(excluded, rows, {**now, "s0": changed}) == set()
    assert shard_signature(100, 7, 2.0, 0) != shard_signature(100, 7, 2.0, 1) != shard_signature(100, 7, 3.0, 1)
    # A listing without a size or time: never skipped.
    assert shard_signature(None, 7) is None and shard_signature(100, None) is None
    assert trained_on_whole(excluded, rows, {**now, "s0": None}) == set()
    # As many consumed keys as rows, but other keys (consumed under an earlier weight: copies that are not rows
    # now): read again.
    assert trained_on_whole(excluded, {"s0": [2, now["s0"], key_digest(["k1", "k3"])]}, now) == set()
    assert key_digest(["a", "b", "c"]) == key_digest(["c", "a", "b"]) != key_digest(["a", "b", "b"])
    assert key_digest(["c"], int(key_digest(["a", "b"]), 16)) == key_digest(["a", "b", "c"])


def test_a_resume_takes_the_saved_shard_rows_for_their_epoch_only(tmp_path, caplog):
    """Rank 0's ``data/shard_rows.json`` (written from the position actor; see test_exact_resume.py) is taken for the
    epoch it was saved in; a checkpoint without one, or with one this version cannot read (logged), reads every
    shard."""
    rows = {"s3://b/d/00000.tar": [64, shard_signature(5000, 1), key_digest(["a"])],
            "s3://b/d/00001.tar": [10, shard_signature(900, 1), key_digest(["b"])]}
    ConsumedSamples(0).write(tmp_path)  # without the actor: no rows saved
    assert not (tmp_path / SHARD_ROWS).exists() and read_shard_rows(tmp_path) == (-1, {})
    (tmp_path / SHARD_ROWS).write_text(json.dumps({"epoch": 3, "shard_rows": rows}))
    resumed = ConsumedSamples(0)
    resumed.restore(tmp_path)
    assert resumed.shard_rows(3) == rows and resumed.shard_rows(4) == {}

    for bad in ({"epoch": 3, "shard_rows": {"s": 64}}, {"epoch": 3, "shard_rows": {"s": [64, "x"]}},
                {"epoch": 3, "shard_rows": {"s": ["64", "x", "y"]}}, {"epoch": 3}, ["s", 64], "{"):
        (tmp_path / SHARD_ROWS).write_text(bad if isinstance(bad, str) else json.dumps(bad))
        caplog.clear()
        resumed.restore(tmp_path)
        assert resumed.shard_rows(3) == {} and "shard_rows.json is not a data position's shard rows" in caplog.text


def test_epoch_seed_is_a_fixed_function_of_seed_and_epoch():
    seeds = {(s, e): epoch_seed(s, e) for s in range(3) for e in range(3)}
    assert len(set(seeds.values())) == 9
    assert epoch_seed(7, 2) == epoch_seed(7, 2) == 1009178997  # the same in every process, run and machine


def test_window_order_is_a_seeded_permutation_that_commutes_with_leaving_rows_out():
    keys = [f"{i:06d}" for i in range(500)]
    order = window_order(keys, seed=7)
    assert sorted(order.tolist()) == list(range(500)) and order.tolist() != list(range(500))
    assert window_order(keys, seed=7).tolist() == order.tolist()
    assert window_order(keys, seed=8).tolist() != order.tolist()
    shuffled = [keys[i] for i in order]
    kept = [k for k in keys if int(k) % 3]  # any subset, e.g. the rows a resume has not trained on yet
    assert [kept[i] for i in window_order(kept, seed=7)] == [k for k in shuffled if int(k) % 3]
    # Not a rotation or a stride of the input: neighbours in the file are spread over the window.
    positions = np.argsort(order)
    assert np.abs(np.diff(positions)).mean() > 100


def test_the_position_keeps_a_count_only_from_a_read_task_of_its_latest_planning():
    """A read task left running by a restarted worker group (an earlier planning) may have read the shard before it
    was rewritten: its count is not kept under the new planning's signature. The signature changes with how the
    shard is read too (other member extensions or columns give other rows)."""
    from mmray.data.pipeline import DataPosition

    position = DataPosition()  # the actor's class, called directly
    first = position.planned(0, {"s0": shard_signature(100, 7), "s1": None}, 0)
    position.shard_read(first, 0, "s0", 64, key_digest(["k"]))
    position.shard_read(first, 0, "s1", 64, key_digest(["k"]))  # no signature (size or time unknown): not kept
    assert position.rows_read() == (0, {"s0": [64, shard_signature(100, 7), key_digest(["k"])]})
    second = position.planned(0, {"s0": shard_signature(100, 8)}, 0)
    position.shard_read(first, 0, "s0", 10, key_digest(["x"]))  # late, from the first planning: ignored
    position.shard_read(second, 1, "s0", 10, key_digest(["x"]))  # another epoch: ignored
    assert position.rows_read()[1]["s0"][0] == 64
    position.shard_read(second, 0, "s0", 12, key_digest(["y"]))
    assert position.rows_read()[1]["s0"] == [12, shard_signature(100, 8), key_digest(["y"])]
    assert shard_signature(100, 7, reader="jpg") != shard_signature(100, 7, reader="png")


def test_modification_times_come_from_one_listing_of_each_folder(tmp_path):
    import os

    import pyarrow.fs as pafs

    from mmray.data.position import listed_mtimes

    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for name in ("00000.tar", "00001.tar", "00000_stats.json"):
            (tmp_path / folder / name).write_bytes(b"x")
            os.utime(tmp_path / folder / name, ns=(1, 10**18 + len(paths)))
        paths += [str(tmp_path / folder / "00000.tar"), str(tmp_path / folder / "00001.tar")]
    gone = str(tmp_path / "c" / "00000.tar")  # its folder is missing: no time, so never skipped
    mtimes = listed_mtimes(pafs.LocalFileSystem(), paths + [gone], threads=2)
    assert set(mtimes) == set(paths)  # only the shards asked for
    assert mtimes == {p: os.stat(p).st_mtime_ns for p in paths}
