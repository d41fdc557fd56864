"""`mmray generate --task caption|vqa`: text from the export's decoder for every usable sample of a data set.

A task says which rows to generate for, with which prompt, and what to write:

- ``caption``: one row per usable sample; the prompt is [BOS]; rows hold the reference ``caption``.
- ``vqa``: one row per question of each usable sample (the ``qa`` list of its JSON metadata, as in the shapes set);
  the prompt is the tokenized question, as in VQA training; rows hold the ``question``, the reference ``answer`` and
  the question's ``qa_type``. Samples without questions give no rows.

Decoding is greedy (``beam`` 1) or beam search (MultimodalModel.generate). Output: one Parquet or JSONL file per
input shard (see mmray.infer.outputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from mmray import storage
from mmray.config import Config, ConfigError
from mmray.data.tokenizer import BOS, EOS, TextTokenizer, qa_entries, qa_text
from mmray.infer.inputs import Rows, check_sources, find_sources, stage_claimed
from mmray.infer.outputs import OutputDir
from mmray.infer.runner import ExportInfo, Job, absolute, load_model, read_export, run


class CaptionRows(Rows):
    keep = ("image", "caption", "key")


class VqaRows(Rows):
    """One row per question of each sample, with the question tokenized as VQA training tokenizes it."""

    keep = ("image", "key")

    def __init__(self, tokenizer_json: str, max_text_len: int):
        self.tokenizer_json, self.max_text_len = tokenizer_json, max_text_len
        self._tokenizer: TextTokenizer | None = None  # parsed on first use, in the worker

    def expand(self, samples: dict[str, np.ndarray], metas: list[bytes | None]) -> dict[str, np.ndarray]:
        from mmray.data.pipeline import decode_meta

        index, qas = [], []
        for i, meta in enumerate(metas):
            for qa in qa_entries(decode_meta(meta)):
                if qa_text(qa.get("question")):
                    index.append(i)
                    qas.append(qa)
        questions = [qa_text(qa["question"]) for qa in qas]
        ids = np.zeros((0, self.max_text_len), np.int64)
        if questions:
            if self._tokenizer is None:
                self._tokenizer = TextTokenizer.from_str(self.tokenizer_json)
            ids = self._tokenizer.encode_batch(questions, self.max_text_len)
        return {"image": samples["image"][index], "key": samples["key"][index], "source": samples["source"][index],
                "question": np.array(questions, dtype=object),
                "answer": np.array([qa_text(qa.get("answer")) for qa in qas], dtype=object),
                "qa_type": np.array([str(qa.get("type", "")) for qa in qas], dtype=object),
                "question_ids": ids}


@dataclass(frozen=True)
class Task:
    """What a generation task reads, how it prompts the decoder, and what it writes."""

    name: str
    objective: str                         # the training objective that taught the decoder this task
    references: tuple[str, ...]            # columns passed from the input to the output
    prompt: str | None                     # the column of prompt ids; None: the [BOS] prompt

    def rows(self, info: ExportInfo) -> Rows:
        if self.name == "vqa":
            return VqaRows(info.tokenizer_json, info.cfg.data.max_text_len)
        return CaptionRows()

    @property
    def schema(self) -> pa.Schema:
        names = ("key", "shard", "source", *self.references, "generated")
        return pa.schema([(n, pa.string()) for n in names])


TASKS = {"caption": Task("caption", "caption", ("caption",), None),
         "vqa": Task("vqa", "vqa", ("question", "answer", "qa_type"), "question_ids")}


def special_ids(tokenizer: TextTokenizer) -> tuple[int, int]:
    """The [BOS] and [EOS] ids generation starts and stops with."""
    ids = tuple(tokenizer.tokenizer.token_to_id(t) for t in (BOS, EOS))
    if None in ids:
        raise ConfigError(f"the export's tokenizer has no {BOS} / {EOS} tokens, which generation needs")
    return ids  # type: ignore[return-value]


def check_can_generate(cfg: Config, task: Task, max_new_tokens: int, beam: int) -> None:
    """ConfigError, naming what to change, unless the export's decoder was trained for ``task``."""
    from mmray.models.objectives import objective_weights

    if cfg.model.decoder_depth == 0:
        raise ConfigError("this export has no decoder (model.decoder_depth=0): it cannot generate text")
    if task.objective not in objective_weights(cfg.model):
        raise ConfigError(f"this export's decoder was not trained for {task.name} "
                          f"(model.{task.objective}_weight resolves to 0)")
    if not 1 <= max_new_tokens <= cfg.data.max_text_len - 1:
        raise ConfigError(f"--max-new-tokens must be in 1..{cfg.data.max_text_len - 1} (the decoder's positions, "
                          f"data.max_text_len - 1), got {max_new_tokens}")
    if beam < 1:
        raise ConfigError(f"--beam must be at least 1, got {beam}")


class GenerateWorker:
    """A Ray Data actor: loads the export once, then generates for decoded batches."""

    def __init__(self, export_dir: str, task: str, max_new_tokens: int, beam: int, use_gpu: bool, threads: int):
        self.model, _, self.tokenizer, self.device = load_model(export_dir, use_gpu, threads)
        self.task, self.max_new_tokens, self.beam = TASKS[task], max_new_tokens, beam
        self.bos, self.eos = special_ids(self.tokenizer)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = ~batch["tally"].astype(bool)
        generated = np.full(len(samples), "", dtype=object)
        if samples.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][samples])).to(self.device)
            prompt = (None if self.task.prompt is None
                      else torch.from_numpy(np.ascontiguousarray(batch[self.task.prompt][samples])).to(self.device))
            ids = self.model.generate(images, self.bos, self.eos, self.max_new_tokens, self.beam, prompt_ids=prompt)
            generated[samples] = [self.tokenizer.decode(row) for row in ids.cpu()]
        keep = ("key", "shard", "source", *self.task.references, "tally", "n_raw", "n_total")
        return {**{k: batch[k] for k in keep}, "generated": generated}


def generate(export_dir: str, srcs: list[str], out: str, *, task: str = "caption", beam: int = 1,
             max_new_tokens: int | None = None, fmt: str = "parquet", batch_size: int = 64, device: str = "auto",
             actors: int | None = None, cpus_per_actor: float = 1.0, max_bad_fraction: float | None = None,
             progress: Callable[[str], None] | None = None, reader_overrides: list[str] | None = None) -> dict:
    """Generate for every shard of ``srcs`` that ``out`` does not hold yet; returns the summary to print.
    ``reader_overrides``: see :func:`mmray.infer.runner.read_export`."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is not supported; allowed values: {', '.join(TASKS)}")
    spec = TASKS[task]
    export_dir = absolute(export_dir)
    info = read_export(export_dir, reader_overrides)
    max_new = (min(info.cfg.eval.max_new_tokens, info.cfg.data.max_text_len - 1) if max_new_tokens is None
               else max_new_tokens)
    check_can_generate(info.cfg, spec, max_new, beam)
    special_ids(info.tokenizer)

    def to_table(rows: dict[str, np.ndarray], shard: str) -> pa.Table:
        if not rows:
            return spec.schema.empty_table()
        n = len(rows["key"])
        columns = {name: [str(v) for v in rows[name]] for name in ("key", "source", *spec.references, "generated")}
        return pa.table({**columns, "shard": [shard] * n}, schema=spec.schema)

    job = Job("generate", info, [], OutputDir(out, fmt), GenerateWorker,
              (export_dir, task, max_new, beam), to_table, spec.rows(info), batch_size, device, actors,
              cpus_per_actor, max_bad_fraction, captions_required=False)  # images without captions: generate
    check_sources(srcs, out)  # before OUT is claimed: a wrong SRC leaves nothing behind
    fresh = job.outputs.claim({"kind": f"generate:{task}", "export": export_dir, "weights_sha256": info.weights_sha256,
                             "task": task, "beam": beam, "max_new_tokens": max_new, "format": fmt, "src": srcs,
                             "columns": spec.schema.names},
                            same=("kind", "weights_sha256", "beam", "max_new_tokens", "format"))
    # Folders of images and CSV / JSONL indexes are written as shards under OUT/_staged first (once).
    read, staged, prefixes = stage_claimed(job, fresh, srcs, export_dir, progress)
    job.sources = find_sources(read, prefixes)
    summary = run(job, progress, staged)
    return {"command": "generate", "task": task, "export": export_dir, "src": srcs, "beam": beam,
            "max_new_tokens": max_new, "format": fmt, **summary}
