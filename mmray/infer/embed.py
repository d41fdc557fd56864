"""`mmray embed`: the image and text embeddings of every usable sample of a data set, from an export.

Output (see mmray.infer.outputs for the layout): one Parquet file per input shard with the columns of
:data:`OUTPUT_SCHEMA`. Embeddings are L2-normalised, exactly the ``image_embeds`` / ``text_embeds`` that the model's
forward returns, so a dot product is the cosine similarity that contrastive training optimised.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from mmray import storage
from mmray.config import Config, ConfigError
from mmray.infer.inputs import Rows, check_sources, find_sources, stage_claimed
from mmray.infer.outputs import OutputDir, float_lists
from mmray.infer.runner import Job, absolute, load_model, read_export, run

OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()),                          # the sample key inside its shard
    ("shard", pa.string()),                        # the input shard (path or URI) the sample came from
    ("source", pa.string()),                       # the original image file (staged folders and indexes) or
                                                   # img2dataset's download URL; "" when unknown
    ("caption", pa.string()),                      # the caption text
    ("image_embedding", pa.list_(pa.float32())),   # (E,) L2-normalised
    ("text_embedding", pa.list_(pa.float32())),    # (E,) L2-normalised
])
PASSED_THROUGH = ("key", "shard", "source", "caption", "tally", "n_raw", "n_total")


def check_can_embed(cfg: Config) -> None:
    """ConfigError unless the export's fusion strategy keeps separate towers and was trained with the projections."""
    from mmray.models.fusion import CONTRASTIVE, FUSIONS
    from mmray.models.objectives import objective_weights

    provides = FUSIONS[cfg.model.fusion].provides
    if not set(CONTRASTIVE) <= set(provides):
        able = [name for name, cls in FUSIONS.items() if set(CONTRASTIVE) <= set(cls.provides)]
        raise ConfigError(f"this export's model.fusion={cfg.model.fusion!r} fuses image and text, so it has no "
                          f"separate image and text embeddings to write (it provides: {', '.join(provides)}); "
                          f"strategies that embed: {', '.join(able)}")
    if "contrastive" not in objective_weights(cfg.model):
        raise ConfigError("this export was trained without the contrastive objective (model.contrastive_weight=0), "
                          "so it has no embedding projections")


def image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) or float (B, 3, S, S) (see normalise_pixels) -> (B, E) L2-normalised: the
    ``image_embeds`` of ``model(images, ids)``, without the text."""
    return model.fusion.contrast_image(model.fusion.encode_image(images))


def text_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, E) L2-normalised: the ``text_embeds`` of ``model(images, ids)``, without the image."""
    return model.fusion.contrast_text(model.fusion.encode_text(ids))


class EmbedWorker:
    """A Ray Data actor: loads the export once, then embeds decoded batches (mmray.infer.inputs schema)."""

    def __init__(self, export_dir: str, use_gpu: bool, threads: int):
        self.model, cfg, _, self.device = load_model(export_dir, use_gpu, threads)
        self.dim = cfg.model.embed_dim

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = ~batch["tally"].astype(bool)
        out = {k: batch[k] for k in PASSED_THROUGH}
        for name, encode, inputs in (("image_embedding", image_embeddings, "image"),
                                     ("text_embedding", text_embeddings, "text_ids")):
            values = np.zeros((len(samples), self.dim), np.float32)              # tally rows stay zero
            if samples.any():
                x = torch.from_numpy(np.ascontiguousarray(batch[inputs][samples])).to(self.device)
                values[samples] = encode(self.model, x).float().cpu().numpy()
            out[name] = values
        return out


def to_table(rows: dict[str, np.ndarray], shard: str) -> pa.Table:
    """One shard's usable samples (columns as EmbedWorker returns them) -> its output table."""
    if not rows:
        return OUTPUT_SCHEMA.empty_table()
    n = len(rows["key"])
    return pa.table({"key": [str(k) for k in rows["key"]], "shard": [shard] * n,
                     "source": [str(s) for s in rows["source"]],
                     "caption": [str(c) for c in rows["caption"]],
                     "image_embedding": float_lists(rows["image_embedding"]),
                     "text_embedding": float_lists(rows["text_embedding"])}, schema=OUTPUT_SCHEMA)


def embed(export_dir: str, srcs: list[str], out: str, *, batch_size: int = 256, device: str = "auto",
          actors: int | None = None, cpus_per_actor: float = 1.0, max_bad_fraction: float | None = None,
          progress: Callable[[str], None] | None = None, reader_overrides: list[str] | None = None) -> dict:
    """Embed every shard of ``srcs`` that ``out`` does not hold yet; returns the summary `mmray embed` prints.
    ``reader_overrides``: see :func:`mmray.infer.runner.read_export`."""
    export_dir = absolute(export_dir)
    info = read_export(export_dir, reader_overrides)
    check_can_embed(info.cfg)
    job = Job("embed", info, [], OutputDir(out, "parquet"), EmbedWorker, (export_dir,), to_table,
              Rows(), batch_size, device, actors, cpus_per_actor, max_bad_fraction)
    check_sources(srcs, out)  # before OUT is claimed: a wrong SRC leaves nothing behind
    fresh = job.outputs.claim({"kind": "embeddings", "export": export_dir, "weights_sha256": info.weights_sha256,
                             "fusion": info.cfg.model.fusion, "embed_dim": info.cfg.model.embed_dim,
                             "image_size": info.cfg.data.image_size, "src": srcs, "columns": OUTPUT_SCHEMA.names},
                            same=("kind", "weights_sha256"))
    # Folders of images and CSV / JSONL indexes are written as shards under OUT/_staged first (once).
    read, staged, prefixes = stage_claimed(job, fresh, srcs, export_dir, progress)
    job.sources = find_sources(read, prefixes)
    summary = run(job, progress, staged)
    return {"command": "embed", "export": export_dir, "src": srcs, **summary}
