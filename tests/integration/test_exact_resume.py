"""Sample-exact resume under Ray Data's streaming split: training is killed mid-epoch, resumed on another worker count,
and the epoch's consumed samples, as the checkpoints record them, are exactly the data set, once each."""
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import ray
from ray.train.v2._internal.execution.callback import WorkerGroupCallback

from mmray.data.pipeline import read_raw
from mmray.data.sources import list_shards
from mmray.data.position import SHARD_ROWS, DataPosition, epoch_seed, read_consumed, read_shard_rows
from mmray.train.checkpoint import verify
from mmray.train.trainer import RunFailedError, train

from tiny_config import tiny_cfg

# The callback below runs in the Train controller, which cannot import this test module: pickle it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRAIN_SAMPLES, MICRO = 192, 16  # one epoch: 12 steps on 1 worker, 6 on 2


def _set_env(name: str, value: str) -> None:
    os.environ[name] = value


class ExitAtStep(WorkerGroupCallback):
    """The n-th worker group that Ray Train starts exits abruptly (every rank, os._exit) after step ``steps[n]``."""

    def __init__(self, *steps: int):
        self.steps, self.started = steps, 0

    def after_worker_group_start(self, worker_group):  # before the workers start the training function
        if self.started < len(self.steps):
            worker_group.execute(_set_env, "MMRAY_TEST_EXIT_AT_STEP", str(self.steps[self.started]))
        self.started += 1


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from mmray.data.prepare import prepare_synthetic

    root = str(tmp_path_factory.mktemp("data") / "shapes")
    prepare_synthetic(root, samples=TRAIN_SAMPLES + 32, seed=4, val_samples=32, samples_per_shard=64)
    return root


def _cfg(data, storage, workers, *overrides):
    # ZeRO-0: its checkpoints load on any worker count (ZeRO-1/2/3 optimizer shards need the same count).
    return tiny_cfg(data, storage, "run.name=exact", f"train.num_workers={workers}", f"train.micro_batch_size={MICRO}",
                    "train.zero_stage=0", "train.checkpoint_every=2", "train.log_every=100", "eval.max_samples=16",
                    "run.keep_last=50", *overrides)


def _ids(table: pa.Table) -> Counter:
    return Counter(zip(table.column("shard").to_pylist(), table.column("key").to_pylist()))


def _states(run: Path) -> dict[str, dict]:
    return {c.name: json.loads((c / "state.json").read_text()) for c in sorted(run.glob("checkpoint_*")) if c.is_dir()}


def test_killed_mid_epoch_and_resumed_on_other_worker_counts_trains_each_sample_once(
        ray_session, small_dataset, tmp_path):
    all_ids = Counter((r["shard"], r["key"]) for r in
                      read_raw(list_shards(f"{small_dataset}/train")).select_columns(["shard", "key"]).take_all())
    assert len(all_ids) == TRAIN_SAMPLES and set(all_ids.values()) == {1}
    run = tmp_path / "exact"

    # 1 worker, killed after step 3 (checkpoint at 2); resumed on 2 workers, killed after step 5 (checkpoint at 4);
    # resumed on 1 worker into epoch 1. (Ray Train may not have registered the checkpoint of step 4 when its workers
    # die; the restore takes it anyway, as the newest complete one on storage.)
    # With no failure budget (train.max_failures=0) each crash ends the run with an error that says so, names the
    # failed ranks and says how to go on.
    for workers, exit_at in ((1, 3), (2, 5)):
        with pytest.raises(RunFailedError, match=r"run exact failed and its failure budget is used up "
                                                 r"\(train\.max_failures=0, .*rank 0: .*run the same command again"):
            train(_cfg(small_dataset, tmp_path, workers, "train.max_steps=20", "train.max_failures=0"),
                  callbacks=[ExitAtStep(exit_at)])
    summary = train(_cfg(small_dataset, tmp_path, 1, "train.max_steps=11"))

    states = _states(run)
    assert {n: (s["world_size"], s["samples_seen"]) for n, s in states.items()} == {
        "checkpoint_00000002": (1, 2 * 16), "checkpoint_00000004": (2, 2 * 16 + 2 * 32),  # 1 -> 2 workers
        "checkpoint_00000006": (1, 96 + 2 * 16), "checkpoint_00000008": (1, 96 + 4 * 16),  # 2 -> 1 worker
        "checkpoint_00000010": (1, 96 + 6 * 16), "checkpoint_00000011": (1, 96 + 7 * 16)}
    assert summary["metrics"]["restored_from"] == "checkpoint_00000004"
    assert summary["steps"] == 11 and summary["samples_seen"] == 96 + 7 * 16
    assert summary["samples_repeated"] == 0
    # The checkpoint resumed from holds the rows of the shards read to their end (rank 0's, in its manifest); the
    # shards all of whose rows it had trained on were not read again.
    restored = run / "checkpoint_00000004"
    assert SHARD_ROWS in json.loads((restored / "manifest.rank0.json").read_text())["files"]
    epoch, rows = read_shard_rows(restored)
    trained = Counter(s for s, _ in _ids(read_consumed(restored)))
    whole = {s for s, (n, _, _) in rows.items() if trained[s] == n}
    assert epoch == 0 and {n for n, _, _ in rows.values()} == {64} and len(whole) >= 1
    assert summary["shards_skipped"] == len(whole)

    # Epoch 0 ends at step 10 (192 samples: 2 steps x 16, 2 x 32, 4 x 16): its checkpoint records every sample of
    # the data set, once each, across its ranks' files, which the manifests cover like every other checkpoint file.
    end = run / "checkpoint_00000010"
    assert verify(str(end))["epoch"] == 0 and states[end.name]["samples_repeated"] == 0
    assert "data/consumed.rank0.parquet" in json.loads((end / "manifest.rank0.json").read_text())["files"]
    assert _ids(read_consumed(end)) == all_ids
    # Step 11 is the first of epoch 1: its consumed set started afresh.
    assert states["checkpoint_00000011"]["epoch"] == 1
    first = _ids(read_consumed(run / "checkpoint_00000011"))
    assert sum(first.values()) == MICRO and set(first.values()) == {1} and set(first) <= set(all_ids)


def test_shard_order_is_a_function_of_seed_and_epoch(ray_session, small_dataset):
    """The training datasource orders its shards by (train.seed, epoch), as its DataPosition actor says: the same
    order for the same epoch in any execution, another order for another epoch."""
    from ray.data.context import DataContext

    position = ray.remote(DataPosition).remote()
    paths = list_shards(f"{small_dataset}/train")
    source = read_raw(paths, 5, position=position)._logical_plan.dag.datasource_or_legacy_reader

    def order(epoch: int) -> list[str]:
        ray.get(position.set.remote(epoch, read_consumed(Path("/nonexistent"))))
        ctx = DataContext.get_current().copy()
        ctx._execution_idx = epoch + 3  # Ray's own reseeding per execution must not matter
        return [p for t in source.get_read_tasks(len(paths), data_context=ctx) for p in t.metadata.input_files]

    assert epoch_seed(5, 0) != epoch_seed(5, 1)
    assert order(0) == order(0) and order(1) == order(1)
    assert sorted(order(0)) == sorted(order(1)) == sorted(p.split("://")[-1] for p in paths)
    assert order(0) != order(1)


def test_mixed_copies_are_left_out_one_by_one(ray_session, small_dataset):
    """With source weights, each copy of a sample (``KEY``, ``KEY~1``) is its own id: resuming leaves out exactly
    the copies that were trained on."""
    paths = list_shards(f"{small_dataset}/train")
    weights = {p: 2.0 if i == 0 else 1.0 for i, p in enumerate(paths)}  # the first shard's 64 samples twice
    position = ray.remote(DataPosition).remote()

    def ids() -> Counter:
        ds = read_raw(paths, 5, weights, 11, position=position)
        return Counter((r["shard"], r["key"]) for r in ds.select_columns(["shard", "key"]).take_all())

    full = ids()
    assert sum(full.values()) == TRAIN_SAMPLES + 64 and set(full.values()) == {1}
    consumed = sorted(full)[::3]  # originals and copies, some of one sample without the other
    ray.get(position.set.remote(0, pa.table({"shard": [s for s, _ in consumed], "key": [k for _, k in consumed]})))
    assert ids() == full - Counter(consumed)


def test_a_shard_trained_on_whole_is_not_read_again_unless_it_changed(ray_session, small_dataset, tmp_path):
    """Each read task that reads a shard to its end tells the position actor how many rows it gave and their keys'
    digest; on a resume, a shard all of whose rows are in the consumed set, and whose size, modification time and
    mixing weight are as they were, is not read (here: garbage of the same size and time, which a read would count
    as a damaged shard); one with a row left is read for that row; the rows that come are exactly the rest of the
    epoch. Mixed with another weight, or rewritten, since its rows were counted, the same shard is read again."""
    import shutil

    root = tmp_path / "train"
    shutil.copytree(f"{small_dataset}/train", root)
    paths = list_shards(str(root))

    def ids(position, weights=None) -> list[tuple[str, str]]:
        ds = read_raw(paths, 5, weights, 11, position=position, shuffle_window=64)
        return [(r["shard"], r["key"]) for r in ds.select_columns(["shard", "key"]).take_all()]

    def resumed(epoch, consumed, rows):  # a restart in another driver: a new actor, handed the checkpoint's position
        position = ray.remote(DataPosition).remote()
        table = pa.table({"shard": [s for s, _ in consumed], "key": [k for _, k in consumed]})
        ray.get(position.set.remote(epoch, table, rows))
        return position

    position = ray.remote(DataPosition).remote()
    full = ids(position)
    epoch, rows = ray.get(position.rows_read.remote())
    assert epoch == 0 and {s: n for s, (n, _, _) in rows.items()} == dict(Counter(s for s, _ in full))
    assert {n for n, _, _ in rows.values()} == {64}
    first, second, _ = sorted(rows)
    consumed = [i for i in full if i[0] == first] + [i for i in full if i[0] == second][:-1]  # all of one, 63 of one

    # The first shard's samples twice now (a weight of 2): its copies were never trained on, so it is read.
    position = resumed(0, consumed, rows)
    doubled = ids(position, {p: 2.0 if p == first else 1.0 for p in paths})
    assert ray.get(position.shards_skipped.remote()) == 0
    assert sorted(i for i in doubled if i[0] == first) == sorted((first, f"{k}~1") for _, k in consumed[:64])

    # Rewritten since its rows were counted (the same size, another modification time): read again.
    stat = os.stat(first)
    Path(first).write_bytes(b"x" * stat.st_size)
    position = resumed(0, consumed, rows)
    assert len([i for i in ids(position) if i[0] == first]) == 64  # its damage read: 64 lost samples
    assert ray.get(position.shards_skipped.remote()) == 0
    # Unchanged since (here: the garbage given back the time it was counted at, which no read would get past): not
    # read.
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    position = resumed(0, consumed, rows)
    rest = ids(position)
    assert sorted(rest) == sorted(set(full) - set(consumed)) and len(rest) == 64 + 1
    assert ray.get(position.shards_skipped.remote()) == 1
    # The next epoch reads every shard, the overwritten one too, whose damage now shows.
    ray.get(position.set.remote(1, pa.table({"shard": [first], "key": [consumed[0][1]]}), rows))
    again = ids(position)
    assert sorted(i for i in again if i[0] != first) == sorted(i for i in full if i[0] != first)
    lost = [key for shard, key in again if shard == first]  # read: its 64 samples (_stats.json) lost to the damage
    assert len(lost) == 64 and all("#truncated" in key for key in lost)
    assert ray.get(position.shards_skipped.remote()) == 1  # epoch 1 left none out


def test_row_order_is_fixed_by_seed_and_epoch_and_kept_on_resume(ray_session, small_dataset):
    """With preserve_order (as the trainer reads), the training rows come in one order for a (seed, epoch): shards
    shuffled, rows shuffled in windows by key hash. Leaving consumed rows out (a resume) keeps the order of the
    rest, so the rows after a resume are exactly the uninterrupted sequence minus what was trained on."""
    paths = list_shards(f"{small_dataset}/train")
    position = ray.remote(DataPosition).remote()

    def keys(window: int = 32) -> list[tuple[str, str]]:
        ds = read_raw(paths, 5, position=position, shuffle_window=window)
        ds.context.execution_options.preserve_order = True
        return [(r["shard"], r["key"]) for r in ds.select_columns(["shard", "key"]).take_all()]

    nothing = read_consumed(Path("/nonexistent"))
    ray.get(position.set.remote(0, nothing))
    full = keys()
    assert len(full) == len(set(full)) == TRAIN_SAMPLES and keys() == full
    by_file = keys(window=0)  # no window shuffle: each shard in its own order, the shards in the same order
    assert sorted(full) == sorted(by_file) and full != by_file
    assert [s for s, _ in full] == [s for s, _ in by_file]  # the windows stay inside their shard
    ray.get(position.set.remote(1, nothing))
    assert keys() != full  # another epoch, another order

    def rest_after(consumed: list[tuple[str, str]]) -> list[tuple[str, str]]:
        ray.get(position.set.remote(0, pa.table({"shard": [s for s, _ in consumed], "key": [k for _, k in consumed]})))
        return keys()

    assert rest_after(full[:40]) == full[40:]  # a crash after 40 rows: the same rows follow
    left_out = set(full[::5])  # any set of trained-on rows (e.g. several workers' shares)
    assert rest_after(sorted(left_out)) == [r for r in full if r not in left_out]
