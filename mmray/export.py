"""Export a training checkpoint as plain, safe-to-load weights, and load such an export back.

An export directory (local or ``s3://``) holds:

- ``model.safetensors``: the full state dict, consolidated from every rank's ZeRO shards (fp32 or bf16);
- ``config.yaml`` and ``tokenizer.json``: everything needed to rebuild the model;
- ``manifest.json``: size and sha256 of each file, written last, so an export without it is incomplete.

Nothing here unpickles with ``weights_only=False``: the ZeRO shards go through
:func:`mmray.train.engine.load_checkpoint_file`, and the export itself is safetensors and text.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from contextlib import contextmanager

import torch
import yaml

from mmray import config as config_lib
from mmray import storage
from mmray.data.tokenizer import TextTokenizer
from mmray.train.checkpoint import (DS_TAG, STATE_FILE, IncompleteCheckpoint, latest_complete, list_checkpoints,
                                    local_copy, verify)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ZERO_TO_FP32_LOCK = threading.Lock()


class ExportError(storage.StorageError):
    """A source that cannot be exported (no complete checkpoint) or an export that cannot be loaded (missing or
    altered file). A StorageError, so the CLI reports it as bad input; the message names the path."""


def resolve_checkpoint(path: str) -> str:
    """The checkpoint to export: ``path`` itself if it is a checkpoint (it must be complete), or, for a run
    directory, its newest complete checkpoint."""
    fs, inner = storage.resolve(path)
    if storage.exists(storage.join(path, STATE_FILE)) or storage.exists(storage.join(path, "manifest.rank0.json")):
        try:
            verify(inner, fs)
        except IncompleteCheckpoint as e:
            raise ExportError(f"checkpoint {path} is incomplete or altered: {e}") from None
        return path
    if not list_checkpoints(inner, fs):
        if not storage.exists(path):
            raise ExportError(f"{path} does not exist")
        raise ExportError(f"{path} is neither a checkpoint nor a run directory with checkpoint_* directories")
    rejected: list[str] = []
    name = latest_complete(inner, fs, rejected=rejected)
    if name is None:
        raise ExportError(f"run {path} has no complete checkpoint; refused: {'; '.join(rejected)}")
    return storage.join(path, name)


class _WeightsOnlyTorch:
    """Stands in for ``torch`` inside DeepSpeed's zero_to_fp32 module, whose loads use ``weights_only=False``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, **_ignored):  # mmap and weights_only are DeepSpeed's; safety is ours
        from mmray.train.engine import load_checkpoint_file

        return load_checkpoint_file(f, map_location=map_location)


@contextmanager
def _zero_to_fp32_weights_only():
    """DeepSpeed's own ZeRO consolidation (padding, partitioning and shared-parameter rules included), with every
    file it reads loaded weights-only. The swap is local to that module and serialised by a lock."""
    from deepspeed.utils import zero_to_fp32

    with _ZERO_TO_FP32_LOCK:
        zero_to_fp32.torch = _WeightsOnlyTorch()
        try:
            yield zero_to_fp32
        finally:
            zero_to_fp32.torch = torch


def consolidate(checkpoint_dir: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a local checkpoint directory, gathered from every rank's shards."""
    if zero_stage == 0:  # no ZeRO partitioning: rank 0's model states hold the whole module
        from mmray.train.engine import load_checkpoint_file

        module = load_checkpoint_file(os.path.join(checkpoint_dir, DS_TAG, "mp_rank_00_model_states.pt"), "cpu")
        return {k: v.float() if v.is_floating_point() else v for k, v in module["module"].items()}
    with _zero_to_fp32_weights_only() as z2f:
        state = z2f.get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    if zero_stage in (1, 2):
        # Frozen parameters (model.freeze) are not in the ZeRO-1/2 optimizer partitions that zero_to_fp32 reads;
        # rank 0's model states hold them whole.
        from mmray.train.engine import load_checkpoint_file

        module = load_checkpoint_file(os.path.join(checkpoint_dir, DS_TAG, "mp_rank_00_model_states.pt"), "cpu")
        for name, tensor in module["module"].items():
            if name not in state:
                state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return state


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_safetensors(state: dict[str, torch.Tensor], dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    """safetensors bytes of ``state`` with floating tensors cast to ``dtype``; shared tensors are stored apart.
    The same state and metadata always give the same bytes (see :func:`_sorted_header`)."""
    from safetensors.torch import save

    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach().to(dtype) if t.is_floating_point() else t.detach()
        t = t.contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return _sorted_header(save(out, metadata=metadata))


def _sorted_header(data: bytes) -> bytes:
    """safetensors bytes with the header's keys sorted. safetensors writes its ``__metadata__`` map in hash order,
    which differs from call to call, so two exports of one checkpoint would differ in their sha256. The header is
    JSON after an 8-byte little-endian length, padded with spaces to a multiple of 8; tensor offsets are relative
    to its end, so rewriting it leaves the data as it is."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def _check_out(out: str) -> None:
    """ExportError when OUT, or a directory above it, is a file: an export is a directory."""
    import pyarrow.fs as pafs

    fs, inner = storage.resolve(out)
    path = inner.rstrip("/")
    while path and path not in ("/", "."):
        if fs.get_file_info(path).type == pafs.FileType.File:
            where = "OUT" if path == inner.rstrip("/") else f"{path}, above OUT,"
            raise ExportError(f"cannot export to {out}: {where} is a file (an export is a directory of files)")
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent == path:
            break
        path = parent


def export(source: str, out: str, dtype: str = "fp32") -> dict:
    """Export the checkpoint (or the run's newest complete checkpoint) at ``source`` to the directory ``out``."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported; allowed values: {', '.join(DTYPES)}")
    _check_out(out)  # before minutes of consolidation, not after
    checkpoint = resolve_checkpoint(source)
    fs, inner = storage.resolve(checkpoint)
    texts = {name: storage.read_text(storage.join(checkpoint, name)) for name in ("config.yaml", "tokenizer.json")}
    cfg = config_lib.from_dict(yaml.safe_load(texts["config.yaml"]))
    step = json.loads(storage.read_text(storage.join(checkpoint, STATE_FILE)))["step"]
    with tempfile.TemporaryDirectory(prefix="mmray-export-") as tmp:
        state = consolidate(local_copy(inner, fs, tmp), cfg.train.zero_stage)
    manifest = write_export(out, state, texts["config.yaml"], texts["tokenizer.json"], dtype, checkpoint, step)
    return {"export": out, "checkpoint": checkpoint, "step": step, "dtype": dtype,
            "parameters": int(sum(t.numel() for t in state.values())), "files": manifest["files"]}


def write_export(out: str, state: dict[str, torch.Tensor], config_yaml: str, tokenizer_json: str,
                 dtype: str = "fp32", source: str = "", step: int = 0) -> dict:
    """Write an export directory: weights, config and tokenizer, then the manifest (last: it marks the export
    whole). Returns the manifest."""
    files = {WEIGHTS_FILE: _to_safetensors(state, DTYPES[dtype], {"format": "pt", "step": str(step),
                                                                  "source": source, "dtype": dtype}),
             "config.yaml": config_yaml.encode(), "tokenizer.json": tokenizer_json.encode()}
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
    manifest = {"source": source, "step": step, "dtype": dtype,
                "files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in files.items()}}
    storage.write_text(storage.join(out, MANIFEST_FILE), json.dumps(manifest, indent=1))
    return manifest


def read_manifest(path: str) -> dict:
    """An export's manifest.json; ExportError names the file when it is not the JSON object mmray writes."""
    try:
        manifest = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): a damaged or altered export") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ExportError(f"{path} has no 'files' table: not an mmray export manifest")
    return manifest


def _read_verified(export_dir: str) -> dict[str, bytes]:
    manifest_path = storage.join(export_dir, MANIFEST_FILE)
    if not storage.exists(manifest_path):
        raise ExportError(f"{manifest_path} is missing: not an mmray export, or an unfinished one")
    manifest = read_manifest(manifest_path)
    data = {}
    for name, entry in manifest["files"].items():
        blob = storage.read_bytes(storage.join(export_dir, name))
        if len(blob) != entry["bytes"] or _sha256(blob) != entry["sha256"]:
            raise ExportError(f"{storage.join(export_dir, name)} does not match its size or sha256 in "
                              f"{MANIFEST_FILE} (truncated or altered)")
        data[name] = blob
    return data


def build_model(cfg: config_lib.Config, tokenizer: TextTokenizer):
    """The model a config describes, as the training loop builds it."""
    from mmray.models.model import MultimodalModel

    return MultimodalModel(cfg.model, tokenizer.vocab_size, tokenizer.pad_id, cfg.data.image_size,
                           cfg.data.max_text_len)


def load(export_dir: str):
    """``(model, config, tokenizer)`` from an export: files checked against the manifest, weights loaded strictly.

    The model is fp32 in eval mode; a bf16 export is widened exactly.
    """
    from safetensors.torch import load as load_safetensors

    data = _read_verified(export_dir)
    cfg = config_lib.from_dict(yaml.safe_load(data["config.yaml"].decode()))
    tokenizer = TextTokenizer.from_str(data["tokenizer.json"].decode())
    model = build_model(cfg, tokenizer)
    model.load_state_dict(load_safetensors(data[WEIGHTS_FILE]), strict=True)
    return model.eval(), cfg, tokenizer
