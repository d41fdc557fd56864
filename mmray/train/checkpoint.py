"""Checkpoints that are either complete or refused: per-rank manifests, verification, fallback, emergency saves.

A checkpoint directory (``<storage_path>/<run>/checkpoint_XXXXXXXX[_tagN]/``) is what Ray Train merges from every
rank's temporary directory. Each rank adds ``manifest.rank{R}.json``, listing every file it wrote with its size and
sha256 plus the world size and step. A checkpoint is complete only when the manifests of ranks 0..world-1 are all
there and every file they list exists with the listed size and digest; anything else (a killed writer, a missing
shard, a truncated or altered file) is refused, and the run resumes from the newest complete checkpoint instead.

The manifest guards against corruption and partial writes, not against an attacker who can rewrite it: that is
what the weights-only loader (:func:`mmray.train.engine.load_checkpoint_file`) is for.

Preemptions: on a node drain (``ray.train.get_preemption_info()``) the loop takes an emergency checkpoint and then
trains no further until Ray Train restarts the run elsewhere (:meth:`Checkpointer.await_restart`), so the restart
loses no step. Each notice is recorded in the loop state (``state["preemptions"]``, saved with the emergency
checkpoint, so it survives the restart) and in the final metrics: when the loop saw it (``notice_at``), the deadline
and the notice left (``deadline_at``, ``notice_s``), the emergency checkpoint (``step``, ``checkpoint``), when it was
persisted and whether that was before the deadline (``checkpoint_done_at``, ``before_deadline``), and, once resumed,
``resumed_from_step``, ``resumed_at`` and ``steps_lost``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from mmray import storage

DS_TAG = "ds"  # DeepSpeed's tag (sub-directory) inside every reported checkpoint
STATE_FILE = "state.json"
MANIFEST_PREFIX = "manifest.rank"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)(?:_([a-z]+)(\d+))?$")
_CHUNK = 8 << 20
DEFAULT_PREEMPTION_DEADLINE_S = 120.0  # Ray Train's deadline for a drain that gave none
PREEMPTION_HOLD_MARGIN_S = 30.0  # how long past a preemption deadline the loop waits for Ray Train's restart
_LOCAL = pafs.LocalFileSystem()


class IncompleteCheckpoint(ValueError):
    """A checkpoint that must not be loaded: partial, truncated, altered or without manifests. Names the file."""


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file that holds more than tensors and plain containers (a pickle that could run code)."""


def log_line(msg: str) -> None:
    """A progress line on stderr. Not print(): Ray Train patches print in workers to log *and* echo, doubling lines."""
    sys.stderr.write(f"[mmray] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------------
# Manifests


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str, rank: int, world_size: int, step: int) -> dict:
    """List every file under the local ``directory`` (this rank's part of a checkpoint) in its manifest."""
    root = Path(directory)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith(MANIFEST_PREFIX):
            files[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(_LOCAL, str(p))}
    manifest = {"rank": rank, "world_size": world_size, "step": step, "files": files}
    (root / manifest_name(rank)).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _read_json(fs: pafs.FileSystem, path: str, name: str) -> dict:
    try:
        with fs.open_input_stream(path) as f:
            value = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise IncompleteCheckpoint(f"{name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise IncompleteCheckpoint(f"{name} does not hold a JSON object")
    return value


def verify(path: str, fs: pafs.FileSystem | None = None) -> dict:
    """Check that the checkpoint at ``path`` is complete and unaltered; return its loop state (state.json).

    ``path`` is a local path or ``s3://`` URI, or a path inside ``fs`` when a pyarrow filesystem is given. Raises
    :class:`IncompleteCheckpoint` naming the first file at fault. Sizes are checked for every file before any
    digest is computed, so a partial checkpoint is refused without reading all of it.
    """
    if fs is None:
        fs, path = storage.resolve(path)
    path = path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    sizes = {info.path[len(path) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}
    if not sizes:
        raise IncompleteCheckpoint("the checkpoint directory is empty or missing")
    if manifest_name(0) not in sizes:
        raise IncompleteCheckpoint(f"{manifest_name(0)} is missing (a checkpoint without manifests, or a writer "
                                   "killed before it finished)")
    first = _read_json(fs, f"{path}/{manifest_name(0)}", manifest_name(0))
    world, step = first.get("world_size"), first.get("step")
    if not isinstance(world, int) or world < 1 or not isinstance(step, int):
        raise IncompleteCheckpoint(f"{manifest_name(0)} lacks a valid world_size and step")
    expected: dict[str, dict] = {}
    for rank in range(world):
        name = manifest_name(rank)
        if name not in sizes:
            raise IncompleteCheckpoint(f"{name} is missing ({world} ranks wrote this checkpoint)")
        m = first if rank == 0 else _read_json(fs, f"{path}/{name}", name)
        if (m.get("rank"), m.get("world_size"), m.get("step")) != (rank, world, step):
            raise IncompleteCheckpoint(f"{name} does not match {manifest_name(0)} (rank, world_size or step)")
        for rel, entry in (m.get("files") or {}).items():
            if rel in expected and expected[rel] != entry:
                raise IncompleteCheckpoint(f"{rel} is listed with different contents by two manifests")
            expected[rel] = entry
    stray = sorted(n for n in sizes if n.startswith(MANIFEST_PREFIX) and n not in map(manifest_name, range(world)))
    if stray:
        raise IncompleteCheckpoint(f"{stray[0]} belongs to no rank of a {world}-rank checkpoint (mixed writes)")
    if STATE_FILE not in expected:
        raise IncompleteCheckpoint(f"{STATE_FILE} is not listed in {manifest_name(0)}")
    for rel, entry in expected.items():
        if rel not in sizes:
            raise IncompleteCheckpoint(f"{rel} is missing")
        if sizes[rel] != entry.get("bytes"):
            raise IncompleteCheckpoint(f"{rel} has {sizes[rel]} bytes, the manifest says {entry.get('bytes')} "
                                       "(truncated or overwritten)")
    for rel, entry in expected.items():
        if _sha256(fs, f"{path}/{rel}") != entry.get("sha256"):
            raise IncompleteCheckpoint(f"{rel} does not match its sha256 in the manifest (corrupted or altered)")
    state = _read_json(fs, f"{path}/{STATE_FILE}", STATE_FILE)
    if state.get("step") != step or state.get("world_size", world) != world:
        raise IncompleteCheckpoint(f"{STATE_FILE} disagrees with the manifests on step or world_size")
    return state


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints in a run directory


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """Sort key of a checkpoint directory name (step, then rerun number); None for anything else."""
    m = _CHECKPOINT_NAME.match(name)
    return (int(m.group(1)), int(m.group(3) or 0)) if m else None


def list_checkpoints(run_dir: str, fs: pafs.FileSystem | None = None) -> list[str]:
    """Names of the ``checkpoint_*`` directories in a run directory, newest first; [] if it does not exist."""
    if fs is None:
        fs, run_dir = storage.resolve(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(run_dir.rstrip("/"), recursive=False, allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and checkpoint_order(i.base_name)]
    return sorted(names, key=checkpoint_order, reverse=True)


def latest_complete(run_dir: str, fs: pafs.FileSystem | None = None, skip: tuple[str, ...] = (),
                    rejected: list[str] | None = None, log=log_line) -> str | None:
    """The name of the newest complete checkpoint in ``run_dir`` (not in ``skip``); each one refused is logged
    and, as ``"name: reason"``, appended to ``rejected``."""
    if fs is None:
        fs, run_dir = storage.resolve(run_dir)
    for name in list_checkpoints(run_dir, fs):
        if name in skip:
            continue
        try:
            verify(f"{run_dir.rstrip('/')}/{name}", fs)
            return name
        except IncompleteCheckpoint as e:
            log(f"refusing checkpoint {name}: {e}")
            if rejected is not None:
                rejected.append(f"{name}: {e}")
    return None


def unique_name(step: int, taken: set[str], tag: str, always: bool = False) -> str:
    """``checkpoint_{step}``, or ``checkpoint_{step}_{tag}N`` when that name is taken (or ``always``).

    Ray Train needs a fresh directory for every report; names already in the run directory (a refused checkpoint
    that was fallen back from, an earlier re-evaluation) are never reused.
    """
    base = f"checkpoint_{step:08d}"
    if base not in taken and not always:
        return base
    used = [checkpoint_order(n)[1] for n in taken if n.startswith(f"{base}_{tag}") and checkpoint_order(n)]
    return f"{base}_{tag}{max(used, default=0) + 1}"


# ---------------------------------------------------------------------------------------------------------------
# The per-worker side: restore, save, preemption


@dataclass
class Decision:
    """What rank 0 decided at start-up; broadcast so that every rank loads the same checkpoint."""

    name: str | None = None  # checkpoint directory to resume from; None starts fresh
    rejected: list[str] = field(default_factory=list)  # "name: reason" for each checkpoint refused
    taken: list[str] = field(default_factory=list)  # checkpoint names already in the run directory


def _broadcast(obj, rank: int):
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_location(checkpoint) -> tuple[pafs.FileSystem, str] | None:
    """The run directory (filesystem, path) from Ray's storage context, else from the checkpoint handed back."""
    import ray.train

    try:
        ctx = ray.train.get_context().get_storage()
        return ctx.storage_filesystem, ctx.experiment_fs_path
    except Exception:  # a developer API; the checkpoint's parent is the same directory
        if checkpoint is None:
            return None
        return checkpoint.filesystem, checkpoint.path.rstrip("/").rsplit("/", 1)[0]


def decide(checkpoint, location: tuple[pafs.FileSystem, str] | None, log=log_line) -> Decision:
    """Verify the checkpoint Ray hands back (or a newer complete one that Ray did not register); on any defect fall
    back to the newest complete one in the run dir."""
    if location is None:
        return Decision()
    fs, run_dir = location
    taken = list_checkpoints(run_dir, fs)
    if checkpoint is None:
        # Ray Train hands back none when it has not registered one, e.g. a node died while its report of a
        # checkpoint was in flight: a complete checkpoint on storage still counts, so no finished step is lost.
        found = latest_complete(run_dir, fs, log=log) if taken else None
        if found is not None:
            log(f"Ray Train handed back no checkpoint, but {found} is complete in {run_dir}: resuming from it")
        return Decision(name=found, taken=taken)
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    # Likewise, workers that die soon after a checkpoint can leave it complete on storage but unregistered (seen
    # when they exited a step after reporting it): Ray Train then hands back an older one. The newer one is resumed
    # from, so that the steps it holds are not trained again.
    older = tuple(n for n in taken if checkpoint_order(name) is None or checkpoint_order(n) <= checkpoint_order(name))
    rejected: list[str] = []  # newer checkpoints refused, then the one handed back if it is refused too
    if len(older) < len(taken):
        found = latest_complete(run_dir, fs, skip=older, rejected=rejected, log=log)
        if found is not None:
            log(f"Ray Train handed back {name}, but {found} is newer and complete in {run_dir}: resuming from it")
            return Decision(name=found, rejected=rejected, taken=taken)
    try:
        verify(checkpoint.path, checkpoint.filesystem)
        return Decision(name=name, rejected=rejected, taken=taken)
    except IncompleteCheckpoint as e:
        log(f"REFUSING the latest checkpoint {name}: {e}. Looking for the previous complete checkpoint.")
        rejected.append(f"{name}: {e}")
    newer = tuple(n for n in taken if n not in older)  # all refused above
    fallback = latest_complete(run_dir, fs, skip=(name, *newer), rejected=rejected, log=log)
    if fallback is None:
        log(f"NO COMPLETE CHECKPOINT in {run_dir}: STARTING FROM STEP 0. Every checkpoint there was refused "
            "(see above); they are left in place for inspection.")
    else:
        log(f"resuming from {fallback}, the newest complete checkpoint, instead of {name}")
    return Decision(name=fallback, rejected=rejected, taken=taken)


def load(engine, directory: str, name: str) -> dict:
    """Load DeepSpeed state and the loop state from a local checkpoint directory (weights-only unpickling)."""
    try:
        load_path, _ = engine.load_checkpoint(directory, tag=DS_TAG)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"refusing to load checkpoint {name}: one of its files holds a pickle that is not "
                               f"plain tensors and containers, so it could run code. {e}") from None
    if load_path is None:
        raise IncompleteCheckpoint(f"checkpoint {name} holds no DeepSpeed state under '{DS_TAG}/'")
    return json.loads((Path(directory) / STATE_FILE).read_text())


class Checkpointer:
    """One worker's view of the run's checkpoints: restore at start, save (named uniquely), emergency saves.

    Every method is called by every rank in the same order: restore broadcasts, save and preemption polls are
    barriers in Ray Train.
    """

    def __init__(self, engine, rank: int, world_size: int, extra_files: dict[str, str], cost_meter=None,
                 data_position=None):
        self.engine, self.rank, self.world_size, self.extra_files = engine, rank, world_size, extra_files
        self.cost_meter = cost_meter  # the run's meter actor (rank 0 hands it each preemption record), or None
        # This rank's data position (mmray.data.position.ConsumedSamples), or None: every rank writes its file into
        # each checkpoint (covered by its manifest) and restores from the files of all the checkpoint's ranks.
        self.data_position = data_position
        self.taken: set[str] = set()
        self.restored_from: str | None = None
        self.rejected: list[str] = []
        self._notice = None  # the preemption notice already acted upon
        # One record per preemption notice, carried in the loop state (state["preemptions"], so it survives the
        # restart that the preemption causes) and reported in the final metrics.
        self.preemptions: list[dict] = []
        self._pending: dict | None = None  # the record of a notice whose emergency checkpoint is not saved yet

    def restore(self) -> dict:
        """The loop state to start from: a verified checkpoint's, or step 0. Loads the engine as a side effect."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        decision = decide(checkpoint, _run_location(checkpoint)) if self.rank == 0 else None
        decision = _broadcast(decision, self.rank)
        self.taken, self.rejected = set(decision.taken), decision.rejected
        state = {"step": 0, "samples_seen": 0, "samples_repeated": 0, "epoch": 0, "emergency_checkpoints": 0,
                 "preemptions": []}
        self.preemptions = state["preemptions"]
        if decision.name is None:
            return state
        if checkpoint is not None and checkpoint.path.rstrip("/").endswith("/" + decision.name):
            chosen = checkpoint
        else:
            fs, run_dir = _run_location(checkpoint)
            chosen = ray.train.Checkpoint(f"{run_dir.rstrip('/')}/{decision.name}", filesystem=fs)
        with chosen.as_directory() as d:
            self._check_world_size(json.loads((Path(d) / STATE_FILE).read_text()), decision.name)
            loaded = load(self.engine, d, decision.name)
            if self.data_position is not None:
                self.data_position.restore(d)
        self.restored_from = decision.name
        state.update({k: loaded[k] for k in state if k in loaded})
        state["preemptions"] = self.preemptions = [dict(p) for p in state["preemptions"]]
        self._resumed_after_preemptions(state["step"], chosen)
        return state

    def _resumed_after_preemptions(self, step: int, checkpoint) -> None:
        """Complete the records of the notices that led to this restart: where the run resumed, the steps it lost,
        and (read from storage, since the checkpoint's own state.json was written before it was persisted) when
        the emergency checkpoint finished. After an emergency checkpoint the loop trains no further (see
        :meth:`await_restart`), so resuming from that checkpoint loses no step."""
        for rec in self.preemptions:
            if "resumed_from_step" in rec:
                continue  # an earlier restart
            rec["resumed_from_step"], rec["resumed_at"] = step, round(time.time(), 3)
            # None: unknown (the loop trained on past its emergency checkpoint, or another checkpoint was resumed)
            rec["steps_lost"] = 0 if step == rec.get("step") and not rec.get("hold_timed_out") else None
            if rec.get("checkpoint_done_at") is None and self.rank == 0 and \
                    checkpoint.path.rstrip("/").endswith("/" + str(rec.get("checkpoint"))):
                done = _persisted_at(checkpoint.filesystem, checkpoint.path)
                if done is not None:
                    rec["checkpoint_done_at"] = round(done, 3)
                    rec["before_deadline"] = rec["deadline_at"] is None or done <= rec["deadline_at"]
            if self.rank == 0:
                log_line(f"resumed at step {step} after the preemption notice of step {rec.get('step')}: "
                         + (f"{rec['steps_lost']} steps lost" if rec["steps_lost"] is not None
                            else "steps lost unknown") + "; emergency checkpoint "
                         + {True: "finished before the deadline", False: "finished AFTER the deadline",
                            None: "completion time unknown"}[rec.get("before_deadline")])
                self._tell_meter(rec)

    def _tell_meter(self, record: dict) -> None:
        """Rank 0 hands a preemption record to the run's cost meter (cost.json keeps it). Waited for, briefly: after
        an emergency checkpoint the node may be gone soon; a meter that does not answer only costs the record."""
        if self.rank != 0 or self.cost_meter is None:
            return
        import ray

        try:
            ray.get(self.cost_meter.record_preemption.remote(dict(record)), timeout=10)
        except Exception as e:  # noqa: BLE001 - the record is also in the checkpoint and the final metrics
            log_line(f"could not record the preemption with the cost meter: {e}")

    def _check_world_size(self, saved: dict, name: str) -> None:
        """ZeRO-1/2/3 partition the optimizer state (and ZeRO-3 the parameters) by rank, so a checkpoint only loads
        on the worker count that wrote it. Say so, and what to do, instead of DeepSpeed's shape errors."""
        from mmray.config import ConfigError

        written_by = saved.get("world_size", self.world_size)
        stage = self.engine.zero_optimization_stage()
        if written_by != self.world_size and stage > 0:
            raise ConfigError(
                f"checkpoint {name} was written by {written_by} workers under ZeRO-{stage}, and this run has "
                f"{self.world_size}: its optimizer shards only load on {written_by} workers. Resume with "
                f"train.num_workers={written_by}, or `mmray export` it and start a new run (another run.name) "
                "from the exported weights.")

    def save(self, state: dict, metrics: dict, finished_rerun: bool = False) -> str:
        """Every rank writes its DeepSpeed shards and manifest; rank 0 adds the loop state and metadata; Ray Train
        merges and persists them. A re-evaluation of a finished run is saved as ``..._evalN``."""
        import ray.train

        name = unique_name(state["step"], self.taken, "eval" if finished_rerun else "r", always=finished_rerun)
        emergency, self._pending = self._pending, None
        if emergency is not None:  # the emergency checkpoint of a notice: its record travels in this checkpoint
            emergency.update(step=state["step"], checkpoint=name)
            state.setdefault("preemptions", self.preemptions).append(emergency)
        with tempfile.TemporaryDirectory(prefix="mmray-ckpt-") as d:
            self.engine.save_checkpoint(d, tag=DS_TAG)
            if self.rank == 0:
                (Path(d) / STATE_FILE).write_text(json.dumps({**state, "world_size": self.world_size}))
                for filename, text in self.extra_files.items():
                    (Path(d) / filename).write_text(text)
            if self.data_position is not None:
                self.data_position.write(d)
            write_manifest(d, self.rank, self.world_size, state["step"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        self.taken.add(name)
        if emergency is not None:  # report() returns once the checkpoint is persisted (synchronous upload)
            done = time.time()
            emergency.update(checkpoint_done_at=round(done, 3),
                             before_deadline=emergency["deadline_at"] is None or done <= emergency["deadline_at"])
            if self.rank == 0:
                left = f"{emergency['deadline_at'] - done:.1f} s" if emergency["deadline_at"] else "no deadline"
                log_line(f"emergency checkpoint {name} (step {state['step']}) persisted, {left} before the deadline")
            self._tell_meter(emergency)
        return name

    def preemption_notice(self) -> bool:
        """Poll Ray Train for a node drain (a barrier: call on every rank). True once per new notice."""
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or info == self._notice:
            return False
        self._notice = info
        now = time.time()
        deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        left = deadline - now if deadline is not None else None
        # Completed by save() (step, checkpoint, checkpoint_done_at, before_deadline) and, after the restart, by
        # restore() (resumed_from_step, resumed_at, steps_lost).
        self._pending = {"notice_at": round(now, 3), "deadline_at": deadline,
                         "notice_s": round(left, 1) if left is not None else None,
                         "nodes": list(info.preempted_node_ids), "ranks": list(info.preempted_ranks),
                         "step": None, "checkpoint": None, "checkpoint_done_at": None, "before_deadline": None}
        if self.rank == 0:
            log_line(f"PREEMPTION NOTICE for nodes {', '.join(info.preempted_node_ids)} (ranks "
                 f"{info.preempted_ranks}); deadline "
                 + (f"in {left:.0f} s" if left is not None else "not given")
                 + ": taking an emergency checkpoint now")
        return True

    def await_restart(self, poll_s: float = 0.5) -> None:
        """After an emergency checkpoint, train no further: wait for Ray Train to restart the run elsewhere.

        Ray Train restarts the worker group once the notice's deadline has passed (plus
        ``FailureConfig.preemption_grace_s``), whether or not the node really went, and resumes from the latest
        checkpoint: every step trained after the emergency checkpoint would be trained again (lost). So every rank
        waits here until Ray ends it. Should that not happen within ``PREEMPTION_HOLD_MARGIN_S`` after the deadline
        (Ray Train's own fallback of 120 s when the drain gave none), training goes on and the record says so.
        """
        rec = self.preemptions[-1] if self.preemptions else None
        if rec is None or rec.get("checkpoint_done_at") is None:
            return  # no emergency checkpoint was saved for the last notice: nothing to wait for
        deadline = rec["deadline_at"] or rec["notice_at"] + DEFAULT_PREEMPTION_DEADLINE_S
        until = deadline + PREEMPTION_HOLD_MARGIN_S
        if self.rank == 0:
            log_line(f"waiting for the restart that the preemption brings (deadline in {deadline - time.time():.0f} "
                     "s): steps trained now would be lost")
        while time.time() < until:
            time.sleep(poll_s)
        rec["hold_timed_out"] = True
        if self.rank == 0:
            log_line(f"no restart {PREEMPTION_HOLD_MARGIN_S:.0f} s after the preemption deadline: training on")

    def summary(self) -> dict:
        """Facts about this start-up for the final metrics."""
        return {"restored_from": self.restored_from or "", "rejected_checkpoints": list(self.rejected),
                "preemptions": [dict(p) for p in self.preemptions]}


def _persisted_at(fs: pafs.FileSystem, path: str) -> float | None:
    """When the checkpoint at ``path`` finished being written: the newest modification time of its files."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    except OSError:
        return None
    times = [i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File and i.mtime is not None]
    return max(times, default=None)


def local_copy(path: str, fs: pafs.FileSystem, into: str) -> str:
    """Copy a checkpoint directory from storage to a local directory (a no-op path for local storage)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    os.makedirs(into, exist_ok=True)
    pafs.copy_files(path, into, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return into
