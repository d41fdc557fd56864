"""The data position of a training run: which samples the current epoch has already trained on, for exact resume.

Ray Data's streaming split hands blocks to whichever worker asks first, so "skip the first N batches" is wrong after a
restart, and more so after a change in worker count. Instead every sample is named by its id, ``(shard, key)``:

- Each rank records the ids of the samples it has trained on in the current epoch (:class:`ConsumedSamples`; a
  micro-batch counts once the loop has run it, so rows prefetched but not trained on are not recorded).
- Every checkpoint stores each rank's ids as ``data/consumed.rank{R}.parquet`` (zstd, the shard column
  dictionary-encoded), listed with their sha256 in that rank's manifest like every other checkpoint file.
  Rank 0's file also holds the samples consumed before this attempt, so one checkpoint holds the whole epoch so far.
- On resume, the union of the files of all the ranks that wrote the checkpoint (any world size) is the consumed set.
  Rank 0 hands it, with the epoch, to the run's :class:`DataPosition` actor before each epoch starts; the training
  datasource asks that actor when Ray Data plans the epoch's reads (once per execution, i.e. per epoch), orders the
  shards by ``(train.seed, epoch)`` and drops the consumed ids at the source, before decoding
  (``pyarrow.compute.is_in``, one hash lookup per row). Samples that were in flight but never trained on are read
  again. The consumed set starts empty at every new epoch.
- A shard trained on whole is not read at all (Ray Data still opens it: on S3 one HEAD request): each read task
  that reads a shard to its end tells the actor how many rows it gave (consumed ones included) and a digest of
  their keys (:func:`key_digest`), kept with the shard's signature at the planning (:func:`shard_signature`: its
  size and modification time, its mixing weight and seed, and how it is read); rank 0 saves them with each checkpoint
  (``data/shard_rows.json``, in its manifest). A shard of the data set whose distinct consumed keys are exactly
  the keys it gave (as many, and the same digest), with the same signature now, is left out of the resumed epoch's
  reads (:func:`trained_on_whole`; the summary's ``shards_skipped``). So a preemption late in an epoch of a large
  data set does not read most of it again to drop its rows; a shard rewritten, or mixed with another weight or
  seed, since its rows were counted is read again, and so is one whose consumed keys are another set (keys
  consumed under an earlier weight).

Shuffling is deterministic for a ``(seed, epoch)``, and survives a resume unchanged:

- the shard order (Ray Data's file shuffle, seeded by ``(seed, epoch)``);
- inside each shard, rows are shuffled in windows of ``data.shuffle_buffer`` rows: each window (cut from the shard's
  full row sequence, before anything is left out) is ordered by a seeded hash of each row's key
  (:func:`window_order`). An order by key hash commutes with leaving consumed rows out, so after a resume the rows
  that are left come in exactly the order they would have come in without the interruption;
- the training split runs with Ray Data's ``preserve_order``, which makes the block order and the streaming split's
  row-to-worker assignment a function of the block sequence (no locality-driven dispatch).

So two runs with the same config and seed see the same batches, and with one worker a run resumed after a crash
sees the same remaining batches as the uninterrupted run (same final parameters). With several workers the split
balances rows, and the rows left out on resume change its block sizes: a resumed multi-worker run still trains each
sample of the epoch once, but its rows can reach the workers in another grouping.

The end of an epoch: each rank trains on full micro-batches only (Ray Data's ``drop_last``), and the streaming split
gives every rank the same number of rows (``equal=True``), so at most ``world x micro_batch_size - 1`` samples at the
end of an epoch are left out of that epoch (none when the epoch's remaining rows divide evenly).

``samples_repeated`` counts samples a rank trained on that were already in its epoch's consumed set (the set
restored from the checkpoint plus what that rank trained on itself); with exact resume it is 0.

Considered and not used: Ray Data 2.60's own checkpointing (``DataContext.checkpoint_config``) records the rows a
Dataset *write* has finished and filters them on the next run; a training consumer is not a write, and what it has
trained on is only known in the Train worker, after the split and the prefetch.

Limits: the consumed ids of an epoch grow with it (each checkpoint rewrites them whole; zstd keeps a few bytes per
sample), and each rank keeps a set of them in memory to count repeats. A shard with a bad sample, or one not yet
read to its end when the checkpoint was saved, is read again on resume, its consumed rows dropped before decoding.
A bad sample is not trained on, so after a resume it is read and counted again in the data-quality totals.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import FileShuffleConfig

from mmray.data.pipeline import SAMPLE_IDS, DataPosition  # noqa: F401  (the actor lives in a module without Ray Data)
from mmray.data.reader import ShardDatasource

CONSUMED_DIR = "data"
SHARD_ROWS = f"{CONSUMED_DIR}/shard_rows.json"  # rank 0: the rows of each shard read to its end (ConsumedSamples)
_CONSUMED_FILE = re.compile(r"^consumed\.rank(\d+)\.parquet$")
SCHEMA = SAMPLE_IDS
log = logging.getLogger("mmray")


def consumed_name(rank: int) -> str:
    """Path of a rank's consumed ids inside a checkpoint directory."""
    return f"{CONSUMED_DIR}/consumed.rank{rank}.parquet"


def empty() -> pa.Table:
    return SCHEMA.empty_table()


def epoch_seed(seed: int, epoch: int) -> int:
    """The shard-order seed of one epoch: a fixed function of (seed, epoch), the same in every process and run."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def window_order(keys, seed: int) -> np.ndarray:
    """Row order of one shuffle window: ascending seeded 64-bit BLAKE2b hashes of the keys (ties keep their order).

    A function of each key alone, so leaving rows out of a window does not change the order of the rest."""
    salt = int(seed).to_bytes(8, "little")
    hashes = np.fromiter((int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8, salt=salt).digest(), "little")
                          for k in keys), dtype=np.uint64, count=len(keys))
    return np.argsort(hashes, kind="stable")


def distinct(table: pa.Table) -> pa.Table:
    """The table's distinct (shard, key) rows."""
    return table.group_by(["shard", "key"]).aggregate([]) if table.num_rows else table


def by_shard(table: pa.Table) -> dict[str, pa.Array]:
    """Consumed ids grouped per shard: {shard: keys}, what the datasource filters each file with."""
    if not table.num_rows:
        return {}
    grouped = table.group_by("shard").aggregate([("key", "list")])
    return {shard: pa.array(keys, pa.string()) for shard, keys in
            zip(grouped.column("shard").to_pylist(), grouped.column("key_list").to_pylist())}


# Raise when the reader's rows for the same bytes change (other keys, other samples kept): counts taken by an
# earlier version then no longer match any shard's signature, and its shards are read again.
READER_VERSION = 1


def shard_signature(size, mtime, weight=None, mix_seed=None, reader: str = "") -> str | None:
    """What a shard's rows depend on besides its name: its size in bytes and modification time (as listed; on S3 to
    the second), its mixing weight and seed (:class:`mmray.data.mixing.Resample` picks the copies by them), and how
    it is read (``reader``: the member extensions or columns, and :data:`READER_VERSION`). None when the listing gave
    no size or time: such a shard is never skipped."""
    if size is None or mtime is None:
        return None
    return f"{size}|{mtime}|{weight!r}|{mix_seed!r}|{reader}"


def _hash_sum(keys) -> int:
    return sum(int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little") for k in keys)


def key_digest(keys, total: int = 0) -> str:
    """An order-independent digest of a sequence of keys: the sum of their 64-bit BLAKE2b hashes (plus ``total``,
    a sum of earlier keys' hashes), mod 2**64."""
    return f"{(total + _hash_sum(keys)) % 2**64:016x}"


def trained_on_whole(excluded: dict[str, pa.Array], shard_rows: dict[str, list],
                     signatures: dict[str, str | None]) -> set[str]:
    """The shards of the data set (``signatures``: each one's :func:`shard_signature` now) whose every row has been
    trained on: the distinct consumed keys are the keys the shard gave (as many, the same :func:`key_digest`) when a
    read task read it to its end in this epoch, with the same signature as now. A shard with a bad sample is never
    among them (a bad sample is read, then left out by the decoding, never trained on), nor one with a key twice:
    it is read again, its consumed rows dropped."""
    done = set()
    for shard, keys in excluded.items():
        saved, signature = shard_rows.get(shard), signatures.get(shard)
        if signature is None or saved is None or saved[1] != signature:
            continue
        unique = pc.unique(keys)
        if saved[0] == len(unique) and saved[2] == key_digest(unique.to_pylist()):
            done.add(shard)
    return done


def listed_mtimes(fs, paths: list[str], threads: int = 16) -> dict[str, int]:
    """Each path's modification time (ns) from one listing of each folder that holds them (one LIST request per
    1000 objects on S3, not a HEAD per shard; up to ``threads`` folders at once); paths the listing does not give
    are left out (never skipped)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    wanted = set(paths)

    def listed(parent: str) -> dict[str, int]:
        try:
            infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        except OSError as e:  # the resume then reads every shard of the folder again, as it always could
            log.warning("cannot list %s for the shards' modification times (%s); its shards are read again", parent, e)
            return {}
        return {i.path: i.mtime_ns for i in infos if i.path in wanted and i.mtime_ns is not None}

    parents = sorted({p.rsplit("/", 1)[0] for p in paths if "/" in p})
    mtimes: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(parents)))) as pool:
        for found in pool.map(listed, parents):
            mtimes.update(found)
    return mtimes


def drop_consumed(block: pa.Table, keys: pa.Array | None) -> pa.Table:
    """The rows of one shard's raw block whose key is not in ``keys`` (the shard's consumed keys)."""
    if keys is None or not len(keys) or not block.num_rows:
        return block
    return block.filter(pc.invert(pc.is_in(block.column("key"), value_set=keys)))


def read_consumed(directory: str | Path) -> pa.Table:
    """Every rank's consumed ids in a (local) checkpoint directory, concatenated; duplicates are kept."""
    root = Path(directory) / CONSUMED_DIR
    files = sorted(p for p in root.glob("consumed.rank*.parquet") if _CONSUMED_FILE.match(p.name)) \
        if root.is_dir() else []
    tables = [pq.read_table(p, schema=SCHEMA) for p in files]
    return pa.concat_tables(tables) if tables else empty()


class ConsumedSamples:
    """One rank's record of the samples it has trained on in the current epoch, saved with every checkpoint.

    On rank 0, with the run's :class:`DataPosition` actor (``position``), a checkpoint also saves the rows each shard
    gave when it was read to its end in this epoch (``data/shard_rows.json``), so that a resume does not read again
    the shards trained on whole."""

    def __init__(self, rank: int, position=None):
        self.rank, self.position = rank, position
        self.restored_rows: tuple[int, dict[str, list]] = (-1, {})  # (epoch, rows) of the restored checkpoint
        self.before = empty()  # consumed in this epoch before this attempt (all ranks of the restored checkpoint)
        self._parts: list[pa.Table] = []  # what this rank has trained on in this attempt, in order
        self._seen: set[tuple[str, str]] = set()
        self.repeated = 0  # samples this rank trained on again in this attempt (see the module docstring)

    def restore(self, directory: str | Path) -> None:
        """Take the consumed set of the checkpoint in the local ``directory`` (the union over its ranks)."""
        self.before = distinct(read_consumed(directory))
        self.restored_rows = read_shard_rows(directory)
        self._parts, self.repeated = [], 0
        self._seen = set(zip(self.before.column("shard").to_pylist(), self.before.column("key").to_pylist()))

    def add(self, shards, keys) -> None:
        """Record one micro-batch the loop has trained on (its ``shard`` and ``key`` columns)."""
        shards, keys = [str(s) for s in shards], [str(k) for k in keys]
        for sample in zip(shards, keys):
            if sample in self._seen:
                self.repeated += 1
            else:
                self._seen.add(sample)
        self._parts.append(pa.table({"shard": shards, "key": keys}, schema=SCHEMA))

    def shard_rows(self, epoch: int) -> dict[str, list]:
        """The restored checkpoint's ``{shard: [rows, signature, digest]}``, if saved in ``epoch`` (else none)."""
        saved_in, rows = self.restored_rows
        return rows if saved_in == epoch else {}

    def new_epoch(self) -> None:
        self.before, self._parts, self._seen = empty(), [], set()

    def table(self) -> pa.Table:
        """This rank's part of the epoch's consumed ids: what it trained on (repeats included), and on rank 0 also
        what was consumed before this attempt."""
        parts = ([self.before] if self.rank == 0 else []) + self._parts
        return pa.concat_tables(parts) if parts else empty()

    def write(self, directory: str | Path, epoch: int = 0) -> None:
        """Write this rank's file into its (local) part of a checkpoint, before the manifest is made (rank 0 with
        the actor: also the shard rows of ``epoch``, the epoch the checkpoint is saved in)."""
        path = Path(directory) / consumed_name(self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.table(), path, compression="zstd", use_dictionary=["shard"])
        if self.position is not None:
            import ray

            try:
                actor_epoch, rows = ray.get(self.position.rows_read.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001  (a resume then reads every shard again, as it always could)
                log.warning("the rows of the shards read so far are not saved with this checkpoint (%s: %s); a "
                            "resume from it reads its epoch's trained-on shards again", type(e).__name__, e)
                return
            # This epoch's counts: the restored checkpoint's, and the actor's once it serves this epoch (a checkpoint
            # can be saved before this attempt's first epoch starts, or after a restart restored an earlier epoch).
            saved = dict(self.shard_rows(epoch))
            if actor_epoch == epoch:
                saved.update(rows)
            (Path(directory) / SHARD_ROWS).write_text(json.dumps({"epoch": epoch, "shard_rows": saved}))


def read_shard_rows(directory: str | Path) -> tuple[int, dict[str, list]]:
    """A (local) checkpoint's ``(epoch, {shard: [rows, signature, digest]})`` (see :class:`ConsumedSamples`);
    ``(-1, {})`` without it, or with one this version cannot read (logged: the resume reads every shard, as it always
    could)."""
    path = Path(directory) / SHARD_ROWS
    if not path.is_file():
        return -1, {}
    try:
        saved = json.loads(path.read_text())
        epoch, rows = saved["epoch"], saved["shard_rows"]
        if not (isinstance(epoch, int) and isinstance(rows, dict) and all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 3 and type(v[0]) is int
                and isinstance(v[1], str) and isinstance(v[2], str) for k, v in rows.items())):
            raise ValueError("not {'epoch': int, 'shard_rows': {shard: [rows, signature, key digest]}}")
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s is not a data position's shard rows (%s); the resume reads every shard of its epoch, its "
                    "consumed rows dropped", path, e)
        return -1, {}
    return epoch, rows


# per process: the consumed ids of the epoch being read ({shard: keys}, None for a shard not to read), by object id
_EXCLUDED: dict[str, dict[str, pa.Array | None]] = {}


def _excluded(ref) -> dict[str, pa.Array | None]:
    import ray

    key = ref.hex()
    if key not in _EXCLUDED:
        _EXCLUDED.clear()  # one epoch at a time
        _EXCLUDED[key] = ray.get(ref)
    return _EXCLUDED[key]


@functools.lru_cache(maxsize=4)
def _fetched(ref):
    """An object the driver put once (the mixing weights), fetched once a process."""
    import ray

    return ray.get(ref)


def resample_block(block: pa.Table, resample) -> pa.Table:
    """A raw block with each row repeated or dropped by :class:`mmray.data.mixing.Resample` (copies keyed
    ``KEY~1``, ...), taken in Arrow."""
    rows = resample({"shard": np.asarray(block.column("shard").to_pylist(), dtype=object),
                     "key": np.asarray(block.column("key").to_pylist(), dtype=object),
                     "row": np.arange(block.num_rows)})
    block = block.take(pa.array(rows["row"], pa.int64()))
    return block.set_column(block.schema.get_field_index("key"), "key", pa.array(list(rows["key"]), pa.string()))


class PositionedShardDatasource(ShardDatasource):
    """The training split's datasource: each execution (epoch) asks the run's :class:`DataPosition` actor for the
    epoch and its consumed ids, orders the shards by ``(seed, epoch)`` and leaves the consumed samples out.

    ``resample`` (a :class:`mmray.data.mixing.Resample`) mixes sources here, before the filter: each copy of a
    sample has its own key, and so its own place in the consumed set. It holds a weight for every shard, so it goes
    to the object store once, at the first planning, rather than into each read task (Ray Data stores every task on
    its own: N tasks would carry N weights each)."""

    def __init__(self, paths, *, seed: int, position, resample=None, window: int = 0, **kwargs):
        super().__init__(paths, **kwargs)
        self._seed, self._position, self._resample, self._resample_ref = seed, position, resample, None
        self._window = window  # rows shuffled together (data.shuffle_buffer); 0 keeps each shard's order
        self._epoch, self._epoch_seed = 0, epoch_seed(seed, 0)
        self._excluded_ref = None  # {shard: consumed keys} of the epoch being planned, in the object store
        self._plan = 0  # the position actor's number for the latest planning (see DataPosition.shard_read)
        options = (self.image_exts, self.caption_ext, self.meta_ext, self.image_column, self.caption_column,
                   self.key_column, READER_VERSION)
        self._reader = hashlib.blake2b(repr(options).encode(), digest_size=6).hexdigest()

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        import ray

        epoch, consumed, shard_rows = ray.get(self._position.get.remote(), timeout=60)
        if self._resample is not None:
            self._resample_ref, self._resample = ray.put(self._resample), None
        resample = _fetched(self._resample_ref) if self._resample_ref is not None else None
        paths = self._paths()
        mtimes = listed_mtimes(self._filesystem, paths)
        signatures = {path: shard_signature(size, mtimes.get(path), *((resample.weights.get(path), resample.seed)
                                                                      if resample else (None, None)), self._reader)
                      for path, size in zip(paths, self._file_sizes())}
        self._epoch, self._epoch_seed = epoch, epoch_seed(self._seed, epoch)
        self._shuffle = FileShuffleConfig(seed=self._epoch_seed, reseed_after_execution=False)
        excluded = by_shard(consumed)
        done = trained_on_whole(excluded, shard_rows, signatures)
        for shard in done:
            excluded[shard] = None  # not read
        self._excluded_ref = ray.put(excluded) if excluded else None
        self._plan = ray.get(self._position.planned.remote(epoch, signatures, len(done)), timeout=60)
        if done:
            log.info("epoch %d resumes with %d shard(s) trained on whole; they are not read again", epoch, len(done))
        return super().get_read_tasks(parallelism, per_task_row_limit=per_task_row_limit, data_context=data_context)

    def _read_stream(self, f: pa.NativeFile, path: str):
        excluded = _excluded(self._excluded_ref) if self._excluded_ref is not None else {}
        if path in excluded and excluded[path] is None:
            return  # every row of this shard has been trained on in this epoch
        keys = excluded.get(path)
        resample = _fetched(self._resample_ref) if self._resample_ref is not None else self._resample
        window: list[pa.Table] = []
        rows = total = digest = 0
        for block in super()._read_stream(f, path):
            if resample is not None:
                block = resample_block(block, resample)
            window.append(block)
            rows += block.num_rows
            total += block.num_rows
            digest += _hash_sum(block.column("key").to_pylist())
            if rows >= self._window:
                yield from self._emit(window, keys)
                window, rows = [], 0
        if window:
            yield from self._emit(window, keys)
        if total:  # read to its end: the shard's rows this epoch (consumed or not), for the next resume
            self._position.shard_read.remote(self._plan, self._epoch, path, total, key_digest((), digest))

    def _emit(self, window: list[pa.Table], keys: pa.Array | None):
        """One shuffle window (whole reader blocks of the shard, cut before any row is left out): shuffled by key
        hash, the consumed rows left out, in reader-sized blocks."""
        table = window[0] if len(window) == 1 else pa.concat_tables(window)
        if self._window > 1 and table.num_rows > 1:
            table = table.take(pa.array(window_order(table.column("key").to_pylist(), self._epoch_seed)))
        table = drop_consumed(table, keys)
        for start in range(0, table.num_rows, self.rows_per_block):
            yield table.slice(start, self.rows_per_block)
