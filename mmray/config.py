"""One typed config tree for every mmray entrypoint.

A config is built from three layers, each overriding the one before: the dataclass defaults, a YAML file,
and dotted overrides from the command line (``train.lr=3e-4 model.preset=tiny``). The `model` section is
special: ``model.preset`` names a preset from :mod:`mmray.models.presets`, whose values become the defaults
of the section, so a YAML file only states what differs from the preset.

Everything is validated here, before Ray starts: an unknown key names the nearest known key and the allowed
keys, and a bad value names the key and what it accepts. Errors are :class:`ConfigError`, which the CLI turns
into exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what it accepts."""


def _f(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None) -> Any:
    """A config field with its documentation and its constraints, kept next to its default."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max})


@dataclass
class DataConfig:
    """Where the image-text pairs come from and how they are turned into tensors."""

    source: str = _f("synthetic:shapes",
                     "Data set: 'synthetic:shapes' (generated into data.cache_dir when missing); the local path / "
                     "s3:// prefix of a prepared data set (train/ and val/ shards, tokenizer.json); or training "
                     "shards: a prefix with .tar / .parquet shards directly under it (img2dataset's layout; tars may "
                     "be compressed: .tar.gz, .tgz, .tar.bz2, .tar.zst, .tar.lz4), a shard "
                     "file, or a brace pattern ('s3://b/laion/{00000..00099}.tar', '{a,b}'). Several of these "
                     "joined by '::' are read together (see data.source_weights). Shards that are not a prepared "
                     "data set need data.val_source and data.tokenizer.")
    source_weights: str = _f("", "Mixing: one weight per '::' part of data.source, joined by '::' (e.g. '1::2.5'), "
                             "as OpenCLIP's --train-data-upsampling-factors: each sample of a part is used that "
                             "many times per epoch (2.5: twice, and half of them a third time; 0.25: a quarter of "
                             "them; 0: none). Which samples is fixed by train.seed, per sample. Empty: 1 for all.")
    val_source: str = _f("", "Held-out shards for evaluation, in data.source's forms ('::'-joined prefixes, files, "
                         "brace patterns, or prepared data sets, whose val/ split is used). Empty: the val/ splits "
                         "of the prepared data sets in data.source.")
    allow_missing_shards: bool = _f(False, "Skip (with a warning naming them) shards that a brace pattern or file "
                                    "in data.source / data.val_source names but that do not exist; false fails "
                                    "before training, naming the first missing shard.")
    image_column: str = _f("auto", "Parquet shards: the column of encoded image bytes; 'auto' takes the first of "
                           "jpg, png, webp, jpeg, image (img2dataset names it after its --encode_format).")
    caption_column: str = _f("auto", "Parquet shards: the caption column; 'auto' takes txt, else caption "
                             "(img2dataset's parquet output), else text (Hugging Face datasets). A column of "
                             "caption lists (several per image) gives each image its first non-empty caption.")
    image_extensions: str = _f("jpg,jpeg,png,webp", "WebDataset shards: the member extensions that hold a sample's "
                               "image, comma-separated, the first one a sample has wins. A member's extension is "
                               "everything after the first dot of its file name, matched case-insensitively "
                               "('000123.image.png' has 'image.png'); write it without the leading dot.")
    caption_extension: str = _f("txt", "WebDataset shards: the member extension of the caption (UTF-8 text), e.g. "
                                "'caption' for '000123.caption'; not one of data.image_extensions.")
    metadata_extension: str = _f("json", "WebDataset shards: the member extension of the sample's JSON metadata "
                                 "(QA pairs, zero-shot label; optional per sample); not one of "
                                 "data.image_extensions nor data.caption_extension.")
    synthetic_samples: int = _f(12000, "Samples generated for 'synthetic:shapes' (train + held-out val).", min=16)
    synthetic_val_samples: int = _f(512, "Held-out validation samples for 'synthetic:shapes'.", min=8)
    synthetic_seed: int = _f(0, "Seed of the generated 'synthetic:shapes' set.")
    cache_dir: str = _f("~/.cache/mmray/data", "Where generated synthetic data sets are cached (local or s3://).")
    tokenizer: str = _f("", "Path to a tokenizer.json; empty means the tokenizer.json of the (first) prepared data "
                        "set in data.source.")
    image_size: int = _f(64, "Side in pixels that images are resized to before the model.", min=8)
    max_text_len: int = _f(32, "Token sequence length; captions are truncated or padded to it.", min=4)
    shuffle_buffer: int = _f(2048, "Rows of a shard shuffled together: each shard is read in windows of this many "
                             "rows, each ordered by a hash of (train.seed, epoch, sample key), after the shard order "
                             "is shuffled by (train.seed, epoch). Deterministic, and the same order after a resume; "
                             "0 keeps each shard's own order.", min=0)
    max_bad_fraction: float = _f(0.01, "Stop the run when more than this fraction of samples is bad (corrupt "
                                 "images, missing or non-UTF-8 captions, truncated shards); bad samples below it "
                                 "are skipped and counted.", min=0.0, max=1.0)


@dataclass
class ModelConfig:
    """Architecture. ``preset`` supplies the defaults of every other key in this section."""

    preset: str = _f("tiny", "Named architecture preset (see `mmray model list`).")
    fusion: str = _f("late", "How image and text are fused (see `mmray model list`).")
    embed_dim: int = _f(128, "Width of the shared image-text embedding space.", min=1)
    patch_size: int = _f(8, "ViT patch side in pixels; data.image_size must be a multiple of it.", min=1)
    image_width: int = _f(128, "ViT hidden width.", min=1)
    image_depth: int = _f(3, "ViT blocks.", min=1)
    image_heads: int = _f(4, "ViT attention heads; must divide image_width.", min=1)
    text_width: int = _f(128, "Text Transformer hidden width.", min=1)
    text_depth: int = _f(2, "Text Transformer blocks.", min=1)
    text_heads: int = _f(4, "Text attention heads; must divide text_width.", min=1)
    mlp_ratio: float = _f(4.0, "FFN hidden size as a multiple of the width.", min=0.25)
    dropout: float = _f(0.0, "Dropout in attention outputs and FFNs.", min=0.0, max=0.9)
    temperature_init: float = _f(0.07, "Initial contrastive softmax temperature (learned).", min=1e-4, max=1.0)
    fusion_layers: str = _f("", "hierarchical: comma-separated block indices after which the two towers exchange "
                            "information by cross-attention, e.g. '0,2'; each below min(image_depth, text_depth). "
                            "Empty means after every block of the shallower tower.")
    fusion_depth: int = _f(2, "attention: cross-attention fusion layers on top of the towers.", min=1)
    cross_attention_both_ways: bool = _f(False, "attention: image tokens also attend to the text (not only text "
                                         "to image).")
    decoder_depth: int = _f(0, "Transformer decoder blocks (width text_width) for captioning; 0 means no decoder.",
                            min=0)
    contrastive_weight: float = _f(-1.0, "Weight of the image-text contrastive loss; -1 (auto) means 1 where "
                                   "model.fusion provides it (late, attention), else 0.", min=-1.0)
    itm_weight: float = _f(-1.0, "Weight of the image-text matching loss with hard negatives; -1 (auto) means 1 "
                           "where model.fusion fuses (early, hierarchical, attention), else 0.", min=-1.0)
    caption_weight: float = _f(-1.0, "Weight of the captioning (next-token) loss; -1 (auto) means 1 when "
                               "model.decoder_depth > 0, else 0.", min=-1.0)
    vqa_weight: float = _f(0.0, "Weight of the VQA loss (the decoder generates the answer to a question about the "
                           "image); needs model.decoder_depth > 0 and data with QA pairs (the shapes set has them). "
                           "-1 (auto) means 1 when there is a decoder.", min=-1.0)
    late_combine: str = _f("concat", "late: how the pooled image and text features are combined into the memory "
                           "the decoder heads read (captioning, VQA): 'concat' projects their concatenation, "
                           "'gated' takes a learned sigmoid-gated sum.", choices=("concat", "gated"))
    init_image: str = _f("", "Fine-tuning: initialise the image tower from pretrained weights instead of at random. "
                         "A local path or s3:// URI of a state-dict file (.safetensors preferred; any other file is "
                         "read with torch.load(weights_only=True), which refuses pickled code) or of an mmray export "
                         "directory (`mmray export`; the tower's keys are taken from its model.safetensors). The check "
                         "is strict: missing, unexpected and mis-shaped keys are reported together, so the tower's "
                         "config keys (image_width, image_depth, patch_size, ...) and data.image_size must match the "
                         "weights. Empty: random initialisation. A resumed run restores its checkpoint over these "
                         "weights.")
    init_image_prefix: str = _f("auto", "Key prefix that selects the image tower in model.init_image and is stripped "
                                "from its keys (keys without it are ignored). 'auto': 'fusion.image_encoder.' for an "
                                "mmray export or a file that holds such keys (a whole mmray model), else none. Empty: "
                                "the file holds the tower alone, keyed as the tower names its parameters (e.g. "
                                "'transformer.blocks.0.attn.qkv.weight', 'pos_embed').")
    init_text: str = _f("", "Fine-tuning: initialise the text tower from pretrained weights; like model.init_image "
                        "(text_width, text_depth, data.max_text_len and the tokenizer's vocabulary must match).")
    init_text_prefix: str = _f("auto", "Key prefix that selects the text tower in model.init_text; like "
                               "model.init_image_prefix, with 'fusion.text_encoder.' for 'auto'.")
    freeze: str = _f("", "Comma-separated towers to freeze during training: 'image', 'text' or 'image,text'. Their "
                     "parameters keep their initial (e.g. pretrained) values: requires_grad is off and the optimizer "
                     "never sees them. Dropout in a frozen tower still follows model.dropout. Empty: train everything.")


@dataclass
class TrainConfig:
    """Optimisation and the DeepSpeed / Ray Train set-up. One source for the batch-size arithmetic."""

    num_workers: int = _f(2, "Ray Train workers (data-parallel ranks).", min=1)
    use_gpu: str = _f("auto", "Train on GPUs: 'auto' uses them when the cluster has any.",
                      choices=("auto", "true", "false"))
    cpus_per_worker: float = _f(1.0, "CPUs reserved by each Ray Train worker.", min=0.0)
    micro_batch_size: int = _f(64, "Samples per worker per forward/backward.", min=1)
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.", min=1)
    max_steps: int = _f(500, "Optimizer steps in the whole run (the stopping condition).", min=1)
    lr: float = _f(2e-3, "Peak learning rate (AdamW).", min=0.0)
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to biases, norms, embeddings, temperature).",
                             min=0.0)
    warmup_steps: int = _f(50, "Linear warm-up steps before cosine decay.", min=0)
    min_lr_ratio: float = _f(0.02, "Learning rate at the end of the cosine decay, as a ratio of lr.",
                             min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "Global gradient-norm clip (0 disables).", min=0.0)
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage.", choices=(0, 1, 2, 3))
    precision: str = _f("auto", "Numerics: 'auto' is bf16 on GPU and fp32 on CPU.",
                        choices=("auto", "fp32", "bf16", "fp16"))
    seed: int = _f(0, "Seed for parameters and data order.")
    checkpoint_every: int = _f(100, "Report a checkpoint every N steps (and always at the end).", min=1)
    log_every: int = _f(25, "Report training metrics every N steps.", min=1)
    max_failures: int = _f(2, "Worker failures Ray Train recovers from (restarting from the last checkpoint).",
                           min=0)
    max_preemption_failures: int = _f(-1, "Node preemptions (spot reclaims, drains) Ray Train recovers from, counted "
                                      "apart from train.max_failures; -1 means no limit, 0 none.", min=-1)
    layer_decay: float = _f(1.0, "Layer-wise learning-rate decay for the towers (fine-tuning; 1.0 turns it off). A "
                            "parameter in a tower of depth D gets lr x layer_decay^(D + 1 - i), where i is 0 for the "
                            "embeddings (patch / token / position embeddings, [CLS], ln_pre), 1..D for the blocks and "
                            "D + 1 for the tower's final norm; everything after the towers (projections, fusion "
                            "layers, decoder, heads, temperature) trains at lr. Each tower uses its own depth; for "
                            "model.fusion=early the joint Transformer plays the towers' blocks. The warm-up and "
                            "cosine schedule scale every group alike, so the ratios hold throughout.",
                            min=0.0, max=1.0)
    deferred_init: bool = _f(True, "Under ZeRO-3 (train.zero_stage=3), build the model inside deepspeed.zero.Init, "
                             "so that each parameter is partitioned across the workers as soon as its module exists "
                             "and no worker ever holds the whole model (needed for ViT-L-14-sized presets). The weight "
                             "init and model.init_image / model.init_text gather one module at a time. False builds "
                             "the whole model on every worker first (ZeRO-3 then partitions it); ignored at other "
                             "stages.")
    offload_optimizer: str = _f("none", "ZeRO-Offload: 'cpu' keeps the fp32 master weights and the AdamW state in "
                                "host memory and runs the optimizer step there (DeepSpeedCPUAdam on GPU, torch's AdamW "
                                "on CPU), freeing accelerator memory at the cost of step time. Needs "
                                "train.zero_stage 1, 2 or 3.", choices=("none", "cpu"))
    offload_param: str = _f("none", "ZeRO-Infinity parameter offload: 'cpu' keeps each worker's partition of the "
                            "parameters in host memory between uses, fetched for each module's forward and backward. "
                            "Needs train.zero_stage=3.", choices=("none", "cpu"))
    activation_checkpointing: bool = _f(False, "Recompute each Transformer block's activations during backward "
                                        "instead of keeping them from the forward (torch.utils.checkpoint, "
                                        "non-reentrant): activation memory falls to about one block's worth plus the "
                                        "block inputs, for about one extra forward per step. Gradients are unchanged.")
    collective_timeout_s: int = _f(1800, "Seconds a collective (all-reduce, all-gather, barrier) may wait for the "
                                   "other workers before it fails with a timeout error instead of hanging (a dead or "
                                   "stuck peer); Ray Train's TorchConfig(timeout_s), the process group's timeout. The "
                                   "failure then counts against train.max_failures. Keep it above the longest "
                                   "gap between collectives (checkpoint uploads, evaluation).", min=1)

    def global_batch(self, workers: int | None = None) -> int:
        """Samples per optimizer step: micro_batch_size x grad_accum x workers (train.num_workers by default)."""
        return self.micro_batch_size * self.grad_accum * (self.num_workers if workers is None else workers)


@dataclass
class EvalConfig:
    """Held-out evaluation: at the end of training, every ``eval.every`` steps, and in ``mmray eval``."""

    max_samples: int = _f(512, "Held-out pairs used for evaluation (0 means all).", min=0)
    batch_size: int = _f(256, "Batch size for embedding the held-out set.", min=1)
    every: int = _f(0, "Evaluate on the held-out split every N steps during training (0: only at the end).", min=0)
    generate: bool = _f(True, "Decode captions and VQA answers (greedy) for BLEU-4, CIDEr and VQA accuracy when the "
                        "model has a decoder; slower than the loss-only metrics.")
    max_new_tokens: int = _f(16, "Longest generated caption or answer, in tokens.", min=1)
    zero_shot_templates: str = _f("a {},a shape that is a {}",
                                  "Comma-separated prompt templates for zero-shot classification; '{}' is replaced "
                                  "by each label and the templates' text embeddings are averaged per label.")


@dataclass
class RunConfig:
    """Where a run lives. Running the same config again resumes the run from its latest checkpoint."""

    name: str = _f("", "Run name; empty derives one from the config, so the same config resumes the same run.")
    storage_path: str = _f("~/mmray-runs", "Local path or s3:// prefix for checkpoints and results.")
    keep_last: int = _f(2, "Checkpoints kept in the run directory (the newest ones); older ones are deleted.",
                        min=1)
    keep_best: int = _f(0, "Also keep the best N checkpoints by run.keep_best_metric, as complete copies in "
                        "RUN_DIR/best/ (ranked in RUN_DIR/best/best.json), whatever run.keep_last deletes; a new "
                        "best is copied when it is reported, a displaced one is deleted. Resuming still starts from "
                        "the newest complete checkpoint. 0 keeps no best ones.", min=0)
    keep_best_metric: str = _f("loss", "The metric that ranks checkpoints for run.keep_best: 'loss' (the training "
                               "loss, mean over the log window; needs train.checkpoint_every to be a multiple of "
                               "train.log_every) or a held-out metric 'val_<name>' as the periodic evaluation "
                               "reports it, e.g. 'val_i2t_r@1' or 'val_caption_loss' (needs eval.every > 0 and "
                               "train.checkpoint_every a multiple of it). A val_ name the evaluation never reports is "
                               "refused before start; one this run's evaluation does not compute stops the run at "
                               "its first checkpoint, naming the ones it does.")
    keep_best_mode: str = _f("min", "Whether the lowest ('min', for losses) or the highest ('max', for recalls and "
                             "accuracies) run.keep_best_metric is best.", choices=("min", "max"))


@dataclass
class BudgetConfig:
    """Dollars: a hard cap on what a run (or a sweep) may spend, and the price table it is measured with."""

    usd: float = _f(0.0, "Hard cap in USD on the cluster's spend while this run trains (the cost meter prices every "
                    "node from its labels); before each interval the run checkpoints and stops if continuing could "
                    "cross it. 0 means no cap.", min=0.0)
    prices: str = _f("", "Price table override (YAML, local or s3://), merged entry by entry over the packaged "
                     "table (cluster/prices.yaml); empty means $MMRAY_PRICES, else the packaged table alone.")
    teardown_s: float = _f(30.0, "Seconds the budget guard reserves for stopping after the final checkpoint (reporting, "
                           "shutting workers down), paid at the current burn rate.", min=0.0)
    checkpoint_s: float = _f(30.0, "Seconds the budget guard assumes a checkpoint takes until it has timed one (the "
                             "stop it keeps in reserve before the first checkpoint, and at the start of a run); "
                             "set it to what this model's checkpoints take on this storage.", min=0.0)
    meter_interval_s: float = _f(30.0, "Seconds between the cost meter's samples of the cluster's nodes (it also "
                                 "samples at every checkpoint); a node is charged until the first sample that finds "
                                 "it gone. A killed driver's run loses from cost.json the spend since its last "
                                 "sample.", min=0.1)


@dataclass
class Config:
    """The whole tree. Section and key names are what the CLI overrides and Tune search spaces address."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def _digest(self, sections: tuple[str, ...], train_keys: tuple[str, ...], data_keys: tuple[str, ...] = ()) -> str:
        """A short hash of the config without the ``sections``, the ``train_keys`` of its train section and the
        ``data_keys`` of its data section."""
        d = {s: v for s, v in self.to_dict().items() if s not in sections}
        d["train"] = {k: v for k, v in d["train"].items() if k not in train_keys}
        d["data"] = {k: v for k, v in d["data"].items() if k not in data_keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    # Never in the fingerprint: where a run is stored and what it may cost (a new cap resumes the same run), and
    # train keys that change how, not what, is trained (activation checkpointing: the gradients are the same).
    _UNTRAINED = ("log_every", "checkpoint_every", "max_failures", "max_preemption_failures", "collective_timeout_s",
                  "activation_checkpointing")
    # Nor how many bad samples a run tolerates: a run stopped for its bad fraction continues when the limit is
    # raised. (data.cache_dir stays: the samples' ids, (shard path, key), are under it, and a resume matches them.)
    _UNTRAINED_DATA = ("max_bad_fraction",)

    def fingerprint(self) -> str:
        """A short hash of everything that changes what is trained (not where it is stored or logged, nor on which
        resources or how it is evaluated). The resources: a run resumes on another worker count (after spot
        capacity shrank, say); train.use_gpu stays, since it decides the numerics of precision=auto."""
        return self._digest(("run", "budget", "eval"), self._UNTRAINED + ("num_workers", "cpus_per_worker"),
                            self._UNTRAINED_DATA)

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.model.preset}-{self.model.fusion}-{self.fingerprint()}"

    def legacy_run_names(self) -> list[str]:
        """The names that earlier mmray versions derived for this config, newest first, so that a run started then
        is found and continued, with its checkpoints and its spend, instead of started again (none when run.name is
        set): before the fingerprint left out data.max_bad_fraction (2026-12-02), and before it left out
        train.num_workers, train.cpus_per_worker and eval.* (commit 6fed92f). Both with this config's
        data.max_bad_fraction and with its default, which a run stopped for its bad fraction was likely started with
        before the limit was raised."""
        if self.run.name:
            return []
        prefix = f"{self.model.preset}-{self.model.fusion}-"
        default = dataclasses.replace(self, data=dataclasses.replace(
            self.data, max_bad_fraction=DataConfig.__dataclass_fields__["max_bad_fraction"].default))
        names = [prefix + c._digest(sections, keys) for sections, keys in (
            (("run", "budget", "eval"), self._UNTRAINED + ("num_workers", "cpus_per_worker")),
            (("run", "budget"), self._UNTRAINED)) for c in (self, default)]
        return list(dict.fromkeys(names))


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig,
                             "run": RunConfig, "budget": BudgetConfig}


def all_keys() -> list[str]:
    """Every dotted key of the tree, in declaration order."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_FIELDS = {s: {f.name: f for f in dataclasses.fields(cls)} for s, cls in SECTIONS.items()}


def field_type(section: str, name: str) -> type:
    """The Python type of key ``section.name`` (KeyError for an unknown one)."""
    typ = _FIELDS[section][name].type
    return _TYPES.get(typ, typ) if isinstance(typ, str) else typ


def parse_value(raw: str, text: bool = False) -> Any:
    """A dotted override's value: a YAML scalar (numbers and booleans read naturally), or for a ``text`` key the text
    as typed (``007`` stays "007", ``exp #3`` keeps its "#3") unless it is quoted (``''``: YAML's empty text) or a
    YAML list or mapping (which the key's check then refuses by name)."""
    if text and not raw.startswith(("'", '"', "[", "{")):
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def file_error(path: str | os.PathLike, e: OSError | UnicodeDecodeError) -> ConfigError:
    """The ConfigError for a config file that exists but cannot be read as text."""
    if isinstance(e, UnicodeDecodeError):
        return ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})")
    if isinstance(e, IsADirectoryError):
        return ConfigError(f"config file {path} is a directory; give a YAML file")
    return ConfigError(f"config file {path} cannot be read: {e.strerror or e}")


def _nearest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


# The spellings of a boolean that a key takes, in a file or on the command line (YAML's, and 1 / 0)
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(key: str, value: Any, fld: dataclasses.Field) -> Any:
    """Turn a YAML / command-line value into the field's type, or raise a ConfigError naming the key."""
    typ = _TYPES[fld.type] if isinstance(fld.type, str) else fld.type
    meta = fld.metadata
    try:
        if typ is bool:
            if isinstance(value, str) and value.lower() in _BOOL_WORDS:
                value = _BOOL_WORDS[value.lower()]
            elif type(value) is int and value in (0, 1):  # YAML reads `1` as a number
                value = bool(value)
            elif not isinstance(value, bool):
                raise TypeError
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif typ is str:
            choices = meta.get("choices") or ()
            if "true" in choices and "false" in choices and type(value) in (str, int):
                value = _BOOL_WORDS.get(str(value).lower(), value)  # a choice spelled `true` takes every boolean
            if isinstance(value, bool):  # YAML reads `true` as a bool; our str choices spell it as a word
                value = "true" if value else "false"
            if not isinstance(value, (str, int, float)):
                raise TypeError
            value = str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}. {meta['help']}") from None
    if typ is float and not math.isfinite(value):  # nan passes every min/max comparison; inf is no setting either
        raise ConfigError(f"{key}: expected a finite number, got {value!r}. {meta['help']}")
    if meta.get("choices") is not None and isinstance(value, str) and value not in meta["choices"] \
            and value.lower() in meta["choices"]:
        value = value.lower()  # `True` for a choice spelled `true`, as YAML reads booleans in any case
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {allowed}.")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}. {meta['help']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}. {meta['help']}")
    return value


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``['train.lr=3e-4', 'model.preset=tiny']`` -> ``{'train': {'lr': 0.0003}, 'model': {...}}``.

    Values go through :func:`parse_value`: numbers and booleans read naturally, a text key's value is the text as
    typed (``run.name=007`` is "007", not the number 7).
    """
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4).")
        key, raw = item.split("=", 1)
        if key.count(".") != 1:
            raise ConfigError(f"override key {key!r} must be section.key, one of: {', '.join(all_keys())}."
                              + _nearest(key, all_keys()))
        section, name = key.split(".")
        text = name in _FIELDS.get(section, {}) and field_type(section, name) is str
        out.setdefault(section, {})[name] = parse_value(raw, text)
    return out


def overrides_outside(overrides: list[str], keys: tuple[str, ...] = (), sections: tuple[str, ...] = ()) -> list[str]:
    """The overrides (``section.key=value``) whose key is neither one of ``keys`` nor in one of ``sections``: what
    a command that only reads some keys (`mmray eval`, `mmray data inspect`) must refuse."""
    return [o for o in overrides if o.split("=", 1)[0] not in keys and o.split(".", 1)[0] not in sections]


def with_overrides(cfg: "Config", overrides: list[str], keys: tuple[str, ...] = (), sections: tuple[str, ...] = (),
                   allowed: str = "") -> "Config":
    """``cfg`` with ``overrides`` applied, for a command that may change only ``keys`` and ``sections`` (described
    to the user as ``allowed``); any other override is refused with a ConfigError naming it."""
    if not overrides:
        return cfg
    bad = overrides_outside(overrides, keys, sections)
    if bad:
        name = bad[0].split("=", 1)[0]
        hint = "" if name in all_keys() else _nearest(name, [*keys, *(k for k in all_keys()
                                                                       if k.split(".")[0] in sections)])
        raise ConfigError(f"only {allowed} can be overridden here, not: {', '.join(bad)}.{hint}")
    return from_dict(_merge(cfg.to_dict(), parse_overrides(overrides)))


def _merge(base: dict, extra: Mapping) -> dict:
    for section, values in extra.items():
        if isinstance(values, Mapping) and isinstance(base.get(section), dict):
            base[section].update(values)
        else:
            base[section] = values
    return base


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping (YAML shaped)."""
    from mmray.models.presets import PRESETS

    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}.")
    for section, values in raw.items():
        if section == "sweep":
            raise ConfigError("a sweep config (its sweep: section) is read by `mmray sweep --config FILE`, which "
                              "checks it before the search starts; training reads only the sections "
                              f"{', '.join(SECTIONS)}.")
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r}; allowed sections: {', '.join(SECTIONS)}."
                              + _nearest(str(section), list(SECTIONS)))
        if not isinstance(values, Mapping):
            raise ConfigError(f"section {section!r} must be a mapping of keys, got {values!r}.")
    sections = {}
    for section, cls in SECTIONS.items():
        given = dict(raw.get(section) or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in given:
            if name not in fields:
                raise ConfigError(f"unknown key {section}.{name}; allowed keys in {section}: {', '.join(fields)}."
                                  + _nearest(f"{section}.{name}", [f"{section}.{k}" for k in fields]))
        values = {}
        if section == "model":
            preset = _coerce("model.preset", given.get("preset", cls.preset), fields["preset"])
            if preset not in PRESETS:
                raise ConfigError(f"model.preset: {preset!r} is not a preset; allowed values: "
                                  f"{', '.join(PRESETS)}." + _nearest(preset, list(PRESETS)))
            values = dataclasses.asdict(PRESETS[preset])
        values.update(given)
        sections[section] = cls(**{k: _coerce(f"{section}.{k}", v, fields[k]) for k, v in values.items()})
    cfg = Config(**sections)
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: Config) -> None:
    """Cross-key rules that no single field can check on its own."""
    from mmray.models.fusion import FUSIONS
    from mmray.models.objectives import objective_weights

    m, d = cfg.model, cfg.data
    if m.fusion not in FUSIONS:
        raise ConfigError(f"model.fusion: {m.fusion!r} is not a fusion strategy; allowed values: "
                          f"{', '.join(FUSIONS)}." + _nearest(m.fusion, list(FUSIONS)))
    FUSIONS[m.fusion].validate(m)  # the strategy's own keys (e.g. model.fusion_layers)
    objective_weights(m)  # every objective asked for can be provided by model.fusion (and the decoder)
    if d.image_size % m.patch_size:
        raise ConfigError(f"data.image_size ({d.image_size}) must be a multiple of model.patch_size ({m.patch_size}).")
    for width, heads in (("image_width", "image_heads"), ("text_width", "text_heads")):
        if getattr(m, width) % getattr(m, heads):
            raise ConfigError(f"model.{width} ({getattr(m, width)}) must be divisible by model.{heads} "
                              f"({getattr(m, heads)}).")
    if cfg.train.warmup_steps >= cfg.train.max_steps:
        raise ConfigError(f"train.warmup_steps ({cfg.train.warmup_steps}) must be below train.max_steps "
                          f"({cfg.train.max_steps}): lower train.warmup_steps too, e.g. "
                          f"train.warmup_steps={cfg.train.max_steps // 10}.")
    for key, value in (("run.storage_path", cfg.run.storage_path), ("data.cache_dir", d.cache_dir)):
        if not value.strip():  # it would mean the current directory, wherever the command happens to run
            raise ConfigError(f"{key} is empty; give a local path or an s3:// prefix.")
    _check_sources(d)
    webdataset_members(d)
    if d.source.startswith("synthetic:") and d.synthetic_val_samples * 2 > d.synthetic_samples:
        raise ConfigError(f"data.synthetic_val_samples ({d.synthetic_val_samples}) must be at most half of "
                          f"data.synthetic_samples ({d.synthetic_samples}).")
    _check_deepspeed(cfg.train)
    _check_keep_best(cfg)
    _check_templates(cfg.eval.zero_shot_templates)
    from mmray.models.pretrained import parse_freeze

    parse_freeze(m.freeze)  # names only; whether anything is left to train is checked where the model is built


def _check_sources(d: DataConfig) -> None:
    """The syntax of data.source, data.val_source and data.source_weights (storage is checked when data is
    resolved)."""
    from mmray.data.mixing import parse_weights
    from mmray.data.sources import SourceError, check_spec

    try:
        parts = check_spec(d.source)
    except SourceError as e:
        raise ConfigError(f"data.source: {e}") from None
    n_parts = len(parts)
    if n_parts > 1 and any(p.startswith("synthetic:") for p in parts):
        raise ConfigError(f"data.source: a generator ({d.source!r}) cannot be mixed with other parts; write it once "
                          "with `mmray data prepare synthetic:shapes DEST` and name DEST instead.")
    try:
        if d.val_source:
            check_spec(d.val_source)
    except SourceError as e:
        raise ConfigError(f"data.val_source: {e}") from None
    try:
        parse_weights(d.source_weights, n_parts)
    except SourceError as e:
        raise ConfigError(f"data.source_weights: {e}") from None


def _member_extension(key: str, value: str) -> str:
    """One WebDataset member extension, lower-cased; ConfigError names the key when it is empty or ill-formed."""
    ext = value.strip().lower()
    if not ext:
        raise ConfigError(f"{key}: an extension cannot be empty (got {value!r}).")
    if ext.startswith("."):
        raise ConfigError(f"{key}: write the extension without its leading dot: {ext[1:]!r}, not {ext!r}.")
    if ext.endswith(".") or ".." in ext or any(c in ext for c in "/\\, \t"):
        raise ConfigError(f"{key}: {value!r} is not a member extension: the part of a member's file name after its "
                          "key's first dot, e.g. 'jpg' or 'image.png' (no empty part, slash, comma or space).")
    return ext


def webdataset_members(d: DataConfig) -> tuple[tuple[str, ...], str, str]:
    """(image extensions, caption extension, metadata extension) that name WebDataset members, lower-cased;
    a ConfigError names the key of an empty, ill-formed or clashing one."""
    images = [_member_extension("data.image_extensions", e) for e in d.image_extensions.split(",")]
    if len(set(images)) < len(images):
        raise ConfigError(f"data.image_extensions: {d.image_extensions!r} names an extension twice.")
    caption = _member_extension("data.caption_extension", d.caption_extension)
    meta = _member_extension("data.metadata_extension", d.metadata_extension)
    if caption in images:
        raise ConfigError(f"data.caption_extension: {caption!r} is also one of data.image_extensions "
                          f"({d.image_extensions!r}); a member is either the image or the caption.")
    if meta in images or meta == caption:
        which = ("data.caption_extension" if meta == caption
                 else f"one of data.image_extensions ({d.image_extensions!r})")
        raise ConfigError(f"data.metadata_extension: {meta!r} is also {which}; each member has one role.")
    return tuple(images), caption, meta


def _check_deepspeed(t: TrainConfig) -> None:
    """DeepSpeed settings that cannot work together, rejected before anything starts (DeepSpeed 0.19 itself ignores
    offload at stages that do not support it, so a run would silently use the memory it was meant to save).

    Precision is checked again once ``train.use_gpu=auto`` is resolved against the cluster
    (:func:`mmray.train.engine.ds_config`)."""
    if t.use_gpu == "false" and t.precision in ("bf16", "fp16"):
        raise ConfigError(f"train.precision={t.precision} needs GPUs, but train.use_gpu=false trains on CPU, in fp32 "
                          "only; set train.precision=fp32 (or auto), or train.use_gpu=true.")
    if t.offload_optimizer != "none" and t.zero_stage == 0:
        raise ConfigError(f"train.offload_optimizer={t.offload_optimizer} needs ZeRO (train.zero_stage 1, 2 or 3); "
                          "train.zero_stage=0 keeps the optimizer whole on every worker (DeepSpeed would silently "
                          "ignore the offload).")
    if t.offload_param != "none" and t.zero_stage != 3:
        raise ConfigError(f"train.offload_param={t.offload_param} needs train.zero_stage=3 (only ZeRO-3 partitions "
                          f"the parameters; DeepSpeed would silently ignore the offload), got "
                          f"train.zero_stage={t.zero_stage}.")
def check_run_name(name: str) -> None:
    """run.name is a directory under run.storage_path: never a path that leaves it (absolute, or with '..').
    Checked where a run directory is made (training), not when a config is read: exports and checkpoints of runs
    named before this rule still load."""
    parts = name.replace("\\", "/").split("/")
    if name and (name.startswith(("/", "\\", "~")) or any(p in ("", ".", "..") for p in parts)):
        raise ConfigError(f"run.name: {name!r} is not a run name: it names the run's directory under "
                          "run.storage_path, so it may not be absolute or hold '.', '..' or empty path parts; use "
                          "letters, digits, '-', '_' (and '/' between parts to group runs).")


def zero_shot_templates(text: str) -> list[str]:
    """The prompt templates of eval.zero_shot_templates: comma-separated, blanks dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _check_templates(text: str) -> None:
    """eval.zero_shot_templates must give at least one template, each with the ``{}`` a label goes into: the
    evaluation after training would fail on none, and a template without ``{}`` gives every class the same prompt."""
    templates = zero_shot_templates(text)
    if not templates:
        raise ConfigError(f"eval.zero_shot_templates: {text!r} holds no template; give comma-separated prompts with "
                          "'{}' where the label goes, e.g. 'a photo of a {}'.")
    if blind := [t for t in templates if "{}" not in t]:
        raise ConfigError(f"eval.zero_shot_templates: {blind[0]!r} has no '{{}}' for the label (every class would "
                          "get the same prompt); e.g. 'a photo of a {}'.")


def _check_keep_best(cfg: Config) -> None:
    """run.keep_best ranks checkpoints by a metric reported with them: say so before start when it never would be."""
    r, t = cfg.run, cfg.train
    if not r.keep_best:
        return
    if r.keep_best_metric == "loss":
        if t.checkpoint_every % t.log_every:
            raise ConfigError(f"run.keep_best_metric='loss' is reported every train.log_every={t.log_every} steps, "
                              f"so checkpoints every train.checkpoint_every={t.checkpoint_every} steps would carry "
                              "no loss to rank them by: make train.checkpoint_every a multiple of train.log_every.")
    elif r.keep_best_metric.startswith("val_") and len(r.keep_best_metric) > 4:
        from mmray.eval import names

        if not names.known(r.keep_best_metric[4:]):
            raise ConfigError(names.unknown_message("run.keep_best_metric", r.keep_best_metric))
        if not cfg.eval.every or t.checkpoint_every % cfg.eval.every:
            raise ConfigError(f"run.keep_best_metric={r.keep_best_metric!r} is a held-out metric, reported only by "
                              f"the periodic evaluation (eval.every={cfg.eval.every}), so checkpoints every "
                              f"train.checkpoint_every={t.checkpoint_every} steps would carry none to rank them by: "
                              "set eval.every to a divisor of train.checkpoint_every.")
    else:
        raise ConfigError(f"run.keep_best_metric: {r.keep_best_metric!r} is not a metric reported with checkpoints; "
                          "use 'loss' (the training loss) or a held-out metric 'val_<name>' (e.g. 'val_i2t_r@1', "
                          "'val_caption_loss').")


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice (plain YAML keeps the last silently: a
    second ``train:`` section would drop the first one's settings)."""


def _mapping(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by construct_mapping below
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key (a list): construct_mapping names it as YAML's error
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_sections(text: str, path: str | os.PathLike, text_keys: Mapping[str, Iterable[str]] = {}) -> dict:
    """A config file's text as its mapping of sections (training or sweep); ConfigError names the file, and a key
    given twice (with its line). A key that holds text keeps its value as written (see :func:`_keep_text`): the
    training sections' text keys, and ``text_keys`` ({section: keys}) of other sections."""
    loader = _UniqueKeys(text)  # what yaml.load does, keeping the node tree for _keep_text
    try:
        root = loader.get_single_node()
        raw = (loader.construct_document(root) if root is not None else None) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}.")
    _keep_text(loader, root, raw, text_keys)
    return raw


# What YAML 1.1 reads out of a plain scalar that is not text: `010` is the octal number 8, `12:30` the number 750,
# `1_000` 1000, `2024-01-01` a date, `yes` / `on` true.
_NUMBER_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}
_BOOL_TAG = "tag:yaml.org,2002:bool"


def _text_keys(text_keys: Mapping[str, Iterable[str]]) -> dict[str, dict[str, bool]]:
    """{section: {dotted key: whether a boolean is text too}}: the training sections' text keys (a boolean is text
    for a key without choices: `run.name: yes` is "yes", `train.use_gpu: yes` is true), and ``text_keys``."""
    keys: dict[str, dict[str, bool]] = {}
    for section, fields in _FIELDS.items():
        keys[section] = {k: f.metadata.get("choices") is None for k, f in fields.items()
                         if field_type(section, k) is str}
    for section, names in text_keys.items():
        keys.setdefault(section, {}).update({name: True for name in names})
    return keys


def _pairs(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, yaml.Node]:
    """A mapping node's keys (written as text) and value nodes after YAML's merge keys (``<<: *defaults``), the
    last of each key, as the loaded mapping has them; {} for any other node."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    loader.flatten_mapping(node)
    return {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def _keep_text(loader: _UniqueKeys, root: yaml.Node, raw: dict, text_keys: Mapping[str, Iterable[str]]) -> None:
    """Give a key that holds text (run.name, data.source, ...) its value as written in the file, as on the command
    line: YAML would make `run.name: 010` the run "8" (another run's checkpoints), `run.name: 2024-01-01` a date
    and `run.name: yes` "true". Quoted values are text already. ``root``: the file's node tree, as ``loader``
    composed it."""
    sections = _pairs(loader, root)
    for section, keys in _text_keys(text_keys).items():
        for dotted, bool_is_text in keys.items():
            *path, key = dotted.split(".")
            node, values = sections.get(section), raw.get(section)
            for part in path:  # a nested key (sweep.budget.instance_type)
                node, values = _pairs(loader, node).get(part), values.get(part) if isinstance(values, dict) else None
            value = _pairs(loader, node).get(key)
            tags = _NUMBER_TAGS | ({_BOOL_TAG} if bool_is_text else set())
            if isinstance(values, dict) and key in values and isinstance(value, yaml.ScalarNode) \
                    and value.style is None and value.tag in tags:
                values[key] = value.value


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (optional) <- dotted overrides. Raises ConfigError on anything wrong."""
    raw: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise file_error(path, e) from None
        raw = parse_sections(text, path)
    raw = _merge({k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()},
                 parse_overrides(overrides or []))
    return from_dict(raw)


def describe() -> str:
    """Every key with its default and documentation, as commented YAML (what `mmray config` prints)."""
    lines = []
    defaults = Config()
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  # {cls.__doc__.strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            extra = f" Allowed: {', '.join(map(str, f.metadata['choices']))}." if f.metadata["choices"] else ""
            lines.append(f"  {f.name}: {json.dumps(value)}  # {f.metadata['help']}{extra}")
    return "\n".join(lines) + "\n"
