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
import math
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Iterable
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


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written to storage (after the S3 client's retries). Names the destination."""


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
    with fs.open_input_stream(path, compression=None) as f:  # the bytes as stored
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
        with fs.open_input_stream(path, compression=None) as f:
            value = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise IncompleteCheckpoint(f"{name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise IncompleteCheckpoint(f"{name} does not hold a JSON object")
    return value


def verify(path: str, fs: pafs.FileSystem | None = None, digests: bool = True) -> dict:
    """Check that the checkpoint at ``path`` is complete and unaltered; return its loop state (state.json).

    ``path`` is a local path or ``s3://`` URI, or a path inside ``fs`` when a pyarrow filesystem is given. Raises
    :class:`IncompleteCheckpoint` naming the first file at fault. Sizes are checked for every file before any
    digest is computed, so a partial checkpoint is refused without reading all of it; ``digests=False`` checks the
    sizes only (for a server-side copy just made).
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
        if digests and _sha256(fs, f"{path}/{rel}") != entry.get("sha256"):
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


def prune_unmanaged(run_dir: str, kept: Iterable[str], keep_last: int, log=log_line) -> list[str]:
    """Delete the checkpoint directories of ``run_dir`` that run.keep_last no longer covers and that Ray Train will
    never delete, and return their names.

    ``kept`` names the checkpoints Ray Train retains at the end of a run (``Result.best_checkpoints``). It deletes
    the older ones it knows, but not those it never learnt of: a checkpoint whose upload a killed driver interrupted
    (partial, refused at the restore), one that was complete but came after Ray Train's last record of its
    checkpoints, or the checkpoints of an earlier start that ended in an error. Without this, each restart that
    catches a driver there leaves one behind for good, a model's size of storage every time. What goes: every
    ``checkpoint_*`` directory beyond the newest ``keep_last`` in the directory, unless Ray Train keeps it. Never a
    kept one, never ``best/`` or any other name."""
    fs, inner = storage.resolve(run_dir)
    kept = set(kept)
    if not kept:
        return []
    gone = [n for n in list_checkpoints(inner, fs)[keep_last:] if n not in kept]
    for name in gone:
        fs.delete_dir(f"{inner.rstrip('/')}/{name}")
    if gone:
        log(f"deleted {len(gone)} checkpoint(s) that an interrupted start of this run left and that Ray Train "
            f"does not manage, beyond the newest run.keep_last={keep_last}: "
            f"{', '.join(sorted(gone, key=checkpoint_order))}")
    return gone


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
# Keeping the best checkpoints (run.keep_best)
#
# Ray Train owns the run directory's checkpoints and deletes all but the newest run.keep_last (its snapshot of them
# must only list checkpoints that exist, or the next start of the run fails). The best ones by a metric are therefore
# kept as copies in RUN_DIR/best/, outside what Ray manages: RUN_DIR/best/best.json ranks them and is written only
# once a new best's copy is complete, then the copies it no longer lists are deleted.

BEST_DIR = "best"
BEST_INDEX = "best.json"


@dataclass(frozen=True)
class BestPolicy:
    """run.keep_best: keep the ``keep`` best checkpoints by ``metric`` (lowest for mode "min", highest for "max")."""

    keep: int
    metric: str
    mode: str

    @classmethod
    def from_config(cls, run) -> BestPolicy | None:
        return cls(run.keep_best, run.keep_best_metric, run.keep_best_mode) if run.keep_best else None

    def score(self, metrics: dict, name: str) -> float | None:
        """The checkpoint's value of the metric, or None when it was reported without its kind of metrics (a
        checkpoint between evaluations, a budget stop). Raises ConfigError when its kind is there but it is not:
        a held-out metric the evaluation does not compute for this model."""
        from mmray.config import ConfigError

        if self.metric in metrics:
            return float(metrics[self.metric])
        family = [k for k in metrics if k.startswith("val_")] if self.metric.startswith("val_") else []
        if family:
            raise ConfigError(f"run.keep_best_metric={self.metric!r} is not reported by this run's evaluation "
                              f"(checkpoint {name} carries {', '.join(sorted(family))}); choose one of those.")
        return None


def select_best(scores: dict[str, float], keep: int, mode: str) -> list[str]:
    """The names of the ``keep`` best checkpoints, best first. On a tie the newer one wins; NaN is never best."""
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted((n for n, v in scores.items() if not math.isnan(v)),
                    key=lambda n: (sign * scores[n], tuple(-x for x in checkpoint_order(n) or (0, 0))))
    return ranked[:keep]


def read_best_index(run_dir: str, fs: pafs.FileSystem) -> dict:
    """RUN_DIR/best/best.json: ``{"metric", "mode", "scores": {name: value}}``, or {} when there is none."""
    path = f"{run_dir.rstrip('/')}/{BEST_DIR}/{BEST_INDEX}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    return _read_json(fs, path, path)


def keep_best(run_dir: str, fs: pafs.FileSystem, name: str, value: float, policy: BestPolicy,
              log=log_line) -> list[str]:
    """Rank the persisted checkpoint ``name`` of ``run_dir`` (its metric ``value``) among the kept best ones: copy it
    into RUN_DIR/best/ if it is among the ``policy.keep`` best, and delete the copies that it displaces. Returns the
    names kept, best first. A ranking by another metric or mode (the config changed) starts over."""
    run_dir = run_dir.rstrip("/")
    best_dir = f"{run_dir}/{BEST_DIR}"
    index = read_best_index(run_dir, fs)
    if index and (index.get("metric"), index.get("mode")) != (policy.metric, policy.mode):
        log(f"the best checkpoints in {best_dir} were ranked by {index.get('metric')} ({index.get('mode')}); "
            f"ranking by {policy.metric} ({policy.mode}) from now on")
        index = {}
    kept_before = dict(index.get("scores") or {})
    scores = {**kept_before, name: value}
    kept = select_best(scores, policy.keep, policy.mode)
    if name in kept and name not in kept_before:
        _copy_dir(fs, f"{run_dir}/{name}", f"{best_dir}/{name}")
        verify(f"{best_dir}/{name}", fs, digests=False)  # every listed file is there, whole: then it may be ranked
        log(f"checkpoint {name} ({policy.metric}={value:.6g}) is among the {policy.keep} best: kept in {best_dir}")
    _write_json(fs, f"{best_dir}/{BEST_INDEX}",
                {"metric": policy.metric, "mode": policy.mode, "scores": {n: scores[n] for n in kept}})
    for info in fs.get_file_info(pafs.FileSelector(best_dir, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name not in kept:
            fs.delete_dir(info.path)  # displaced, or a copy that a killed writer left unranked
    return kept


def _copy_dir(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """Copy a directory within one filesystem, file by file (on S3 a server-side CopyObject each)."""
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        target = dest + info.path[len(src):]
        if info.type == pafs.FileType.Directory:
            fs.create_dir(target)
        elif info.type == pafs.FileType.File:
            fs.create_dir(target.rsplit("/", 1)[0])
            fs.copy_file(info.path, target)


def _write_json(fs: pafs.FileSystem, path: str, value: dict) -> None:
    """Write a small JSON file whole: a temporary file moved into place (an S3 object is whole anyway)."""
    fs.create_dir(path.rsplit("/", 1)[0])
    tmp = f"{path}.tmp"
    with fs.open_output_stream(tmp, compression=None) as f:
        f.write(json.dumps(value, indent=1, sort_keys=True).encode())
    fs.move(tmp, path)


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


def persist(storage_context, checkpoint, dir_name: str):
    """Upload one rank's checkpoint files the way Ray Train does (``StorageContext.persist_current_checkpoint``:
    pyarrow's copy to the run's filesystem, whose S3 client retries throttling, 5xx answers and dropped connections,
    see :mod:`mmray.storage`), but fail naming the destination. Ray Train then registers no checkpoint, and what
    reached storage lacks manifests or files, so :func:`verify` refuses it: it is never resumed from."""
    try:
        return storage_context.persist_current_checkpoint(checkpoint, dir_name)
    except OSError as e:
        dest = storage_context.build_checkpoint_path_from_name(dir_name)
        if isinstance(storage_context.storage_filesystem, pafs.S3FileSystem):
            dest = storage.S3_SCHEME + dest
        raise CheckpointWriteError(f"could not write checkpoint {dir_name} to {dest}: {e}. It is incomplete and "
                                   "will not be resumed from.") from e


def _upload_fn():
    """:func:`persist` bound to this worker's Ray Train storage, or None (Ray's own upload) outside Ray Train."""
    import functools

    import ray.train

    try:
        return functools.partial(persist, ray.train.get_context().get_storage())
    except Exception:  # noqa: BLE001 - a developer API; Ray's own upload still fails loudly, only less specifically
        return None


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
            "(see above). They stay until the new ones replace them (run.keep_last, as Ray Train keeps any "
            "checkpoint): copy them elsewhere now to keep them for inspection.")
    else:
        log(f"resuming from {fallback}, the newest complete checkpoint, instead of {name}")
    return Decision(name=fallback, rejected=rejected, taken=taken)


def load(engine, directory: str, name: str, written_by: int | None = None, world_size: int | None = None) -> dict:
    """Load DeepSpeed state and the loop state from a local checkpoint directory (weights-only unpickling).

    ``written_by`` is the number of ranks that wrote the checkpoint. When it differs from ``world_size`` (this run's)
    under ZeRO-1/2/3 (whose optimizer shards, and under ZeRO-3 parameters, are partitioned by rank), the checkpoint is
    first converted to DeepSpeed's universal format (:func:`to_universal`), which any world size loads, optimizer
    state included.
    """
    reshard = written_by != world_size and engine.zero_optimization_stage() > 0
    try:
        if reshard:
            load_path = _load_resharded(engine, directory, name, written_by, world_size)
        else:
            load_path, _ = engine.load_checkpoint(directory, tag=DS_TAG)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"refusing to load checkpoint {name}: one of its files holds a pickle that is not "
                               f"plain tensors and containers, so it could run code. {e}") from None
    if load_path is None:
        raise IncompleteCheckpoint(f"checkpoint {name} holds no DeepSpeed state under '{DS_TAG}/'")
    return json.loads((Path(directory) / STATE_FILE).read_text())


def to_universal(ds_dir: str, out_dir: str) -> None:
    """Convert the DeepSpeed ZeRO checkpoint in ``ds_dir`` (one tag's directory) to DeepSpeed's universal checkpoint
    in ``out_dir``: every parameter's fp32 weights and Adam moments whole, which engines of any world size load.

    DeepSpeed's converter unpickles with ``weights_only=False``, so every file is first loaded weights-only
    (:func:`mmray.train.engine.load_checkpoint_file`): a file holding code is refused before the converter sees it.
    """
    import argparse
    import contextlib

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from mmray.train.engine import load_checkpoint_file

    for f in sorted(Path(ds_dir).glob("*.pt")):
        load_checkpoint_file(str(f), map_location="cpu")
    args = argparse.Namespace(input_folder=ds_dir, output_folder=out_dir, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout ends with the CLI's JSON summary
        ds_to_universal(args)


def _repair_zero3_universal_load(engine, optimizer_state: Path) -> None:
    """Undo two defects of DeepSpeed 0.19's ZeRO-3 universal load (stage3.py,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), each seen as a wrong first step after resuming:

    - every optimizer group gets the hyperparameters of the first one ("generally, the hyperparameters of each
      parameter should be the same"), but mmray's groups differ (no weight decay for biases, norms and embeddings;
      layer-wise learning rates): each gets its own back from the checkpoint, whose groups are in the same order;
    - every group's Adam state gets the same ``step`` tensor, which torch's AdamW then increments in place once per
      group and step, so later groups run ahead in the bias correction: each gets its own copy.
    """
    import torch

    from mmray.train.engine import load_checkpoint_file

    saved = load_checkpoint_file(str(optimizer_state), map_location="cpu")["optimizer_state_dict"]["param_groups"]
    optimizer = engine.optimizer.optimizer
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(saved)} optimizer groups and this model "
                         f"{len(optimizer.param_groups)}")
    for group, hyper in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _load_resharded(engine, directory: str, name: str, written_by: int, world: int):
    """Load a ZeRO checkpoint written by ``written_by`` ranks into an engine of ``world`` ranks, through
    :func:`to_universal` (every rank converts its own local copy: ranks on other nodes share no disk)."""
    from mmray.config import ConfigError

    stage = engine.zero_optimization_stage()
    if engine.global_rank == 0:
        log_line(f"checkpoint {name} was written by {written_by} workers and this run has {world}: converting its "
                 f"ZeRO-{stage} shards to DeepSpeed's universal checkpoint (weights and optimizer state carry over)")
    config = engine._config  # noqa: SLF001 - see below
    with tempfile.TemporaryDirectory(prefix="mmray-universal-") as tmp:
        try:
            to_universal(str(Path(directory) / DS_TAG), str(Path(tmp) / DS_TAG))
            # DeepSpeed reads `checkpoint.load_universal` only inside load_checkpoint (its ZeRO optimizers are built
            # universal-ready at any setting), so it is switched on for this one load: which world size wrote the
            # checkpoint is only known after the engine exists.
            config.load_universal_checkpoint = True
            load_path, _ = engine.load_checkpoint(tmp, tag=DS_TAG)
            if stage == 3:
                _repair_zero3_universal_load(engine, Path(tmp) / DS_TAG / "zero" / "optimizer_state.pt")
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the conversion is reported with what to do
            raise ConfigError(
                f"checkpoint {name} was written by {written_by} workers under ZeRO-{stage}, and this run has "
                f"{world}; converting it with DeepSpeed's universal checkpoint failed ({type(e).__name__}: {e}). "
                f"Resume with train.num_workers={written_by}, or `mmray export` it and start a new run (another "
                "run.name) from the exported weights.") from e
        finally:
            config.load_universal_checkpoint = False
    return load_path


def rng_name(rank: int) -> str:
    return f"rng/rank{rank}.pt"


def save_rng(directory: str, rank: int) -> None:
    """This rank's torch CPU RNG state (dropout), so that a resumed run draws what the uninterrupted one would."""
    import torch

    path = Path(directory) / rng_name(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state()}, path)


def restore_rng(directory: str, rank: int) -> None:
    """Set this rank's RNG from a checkpoint of the same world size (weights-only load: a tensor and nothing
    else); checkpoints older than the file, or of another world size, leave the seeded RNG as it is."""
    import torch

    path = Path(directory) / rng_name(rank)
    if path.is_file():
        torch.set_rng_state(torch.load(path, weights_only=True)["torch"])


class Checkpointer:
    """One worker's view of the run's checkpoints: restore at start, save (named uniquely), emergency saves.

    Every method is called by every rank in the same order: restore broadcasts, save and preemption polls are
    barriers in Ray Train.
    """

    def __init__(self, engine, rank: int, world_size: int, extra_files: dict[str, str], cost_meter=None,
                 data_position=None, best: BestPolicy | None = None):
        self.engine, self.rank, self.world_size, self.extra_files = engine, rank, world_size, extra_files
        self.best = best  # run.keep_best, or None
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
            written_by = json.loads((Path(d) / STATE_FILE).read_text()).get("world_size", self.world_size)
            loaded = load(self.engine, d, decision.name, written_by, self.world_size)
            if self.data_position is not None:
                self.data_position.restore(d)
            if written_by == self.world_size:
                restore_rng(d, self.rank)
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
        """Rank 0 hands a preemption record to the run's cost meter (cost.json keeps it); waited for, briefly: after
        an emergency checkpoint the node may be gone soon. The record is also in the checkpoint and the final
        metrics."""
        self.tell_meter("record_preemption", dict(record), what="the preemption")

    def tell_meter(self, method: str, *args, what: str, wait: bool = True, **kwargs) -> None:
        """Rank 0 calls ``method`` of the run's cost meter (when the run has one), and with ``wait`` waits for it,
        briefly: a meter that does not answer (restarting, or its node gone) costs only ``what`` it was told, never
        the run."""
        if self.rank != 0 or self.cost_meter is None:
            return
        import ray

        ref = getattr(self.cost_meter, method).remote(*args, **kwargs)
        if wait:
            try:
                ray.get(ref, timeout=10)
            except Exception as e:  # noqa: BLE001
                log_line(f"could not record {what} with the cost meter: {type(e).__name__}: {e}")

    def save(self, state: dict, metrics: dict, finished_rerun: bool = False) -> str:
        """Every rank writes its DeepSpeed shards and manifest; rank 0 adds the loop state and metadata; Ray Train
        merges and persists them. A re-evaluation of a finished run is saved as ``..._evalN``."""
        import ray.train

        name = unique_name(state["step"], self.taken, "eval" if finished_rerun else "r", always=finished_rerun)
        # Every rank holds the same metrics, so a metric that is missing stops every rank here alike.
        score = self.best.score(metrics, name) if self.best is not None else None
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
                self.data_position.write(d, state["epoch"])
            save_rng(d, self.rank)
            write_manifest(d, self.rank, self.world_size, state["step"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name,
                             checkpoint_upload_fn=_upload_fn())
        self.taken.add(name)
        if self.rank == 0 and self.cost_meter is not None:
            # The spend up to this checkpoint goes into cost.json now (not at the meter's next sample): a driver
            # killed later loses at most the time since the last checkpoint or sample from the run's record.
            self.cost_meter.sample.remote()
        if score is not None and self.rank == 0:
            fs, run_dir = _run_location(ray.train.get_checkpoint())
            keep_best(run_dir, fs, name, score, self.best)
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
