"""`mmray` command line. Parsing and printing only; the work lives in the library.

Every command logs for humans on stderr and prints ONE JSON object as the last line of stdout.
Exit codes: 0 success, 2 bad input (config, paths, data), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Callable

from mmray import config as config_lib

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2

TRAIN_HELP = """\
Train a model. With no arguments: start a local Ray, generate the synthetic shapes data set into
~/.cache/mmray/data if missing, train the tiny preset with 2 Ray Train workers driving DeepSpeed,
evaluate retrieval on held-out pairs, and print the summary. Running the same command again resumes the
run from its latest checkpoint. Under `ray job submit` (RAY_ADDRESS set) it joins the cluster instead.
"""


def _emit(summary: dict) -> None:
    print(json.dumps(summary, default=str), flush=True)


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: an integer of at least 1 (0 would otherwise read as 'use the default')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors also end stdout with the JSON summary line (exit 2), as every other
    failure does."""

    def error(self, message: str):
        _emit({"error": f"{self.prog}: {message}", "kind": "usage"})
        super().error(message)


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command's own parser that ``args`` were parsed with, for its usage line."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from mmray.storage import EndpointUnreachable, StorageError
    from mmray.data.pipeline import BadDataError

    # A path of the wrong kind (a file where a directory belongs, or the other way round, an output that exists as
    # a file) is the user's input too, and so is an S3 endpoint nothing answers at.
    return (config_lib.ConfigError, StorageError, EndpointUnreachable, BadDataError, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, FileExistsError)


def _load_config(args: argparse.Namespace) -> config_lib.Config:
    return config_lib.load(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> dict:
    cfg = _load_config(args)  # validated before Ray starts
    from mmray.train.trainer import train

    logging.getLogger("mmray").info("run %s -> %s", cfg.run_name, cfg.run.storage_path)
    return train(cfg)


def cmd_config(args: argparse.Namespace) -> dict:
    if args.config or args.overrides:
        cfg = _load_config(args)
        print(cfg.to_yaml(), file=sys.stderr)
        return {"valid": True, "run_name": cfg.run_name, "config": cfg.to_dict()}
    print(config_lib.describe(), file=sys.stderr)
    return {"keys": config_lib.all_keys()}


def _only_for(args: argparse.Namespace, sources: str, **flags: str) -> None:
    """Refuse options given for a source they do not apply to (flag name -> attribute)."""
    given = [flag for flag, attr in flags.items() if getattr(args, attr) is not None]
    if given:
        raise config_lib.ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to "
                                     f"{sources}, not to {args.src}")


def cmd_data_prepare(args: argparse.Namespace) -> dict:
    from mmray.data.prepare import is_generator, parse_source, prepare_synthetic

    log = logging.getLogger("mmray")
    try:
        parse_source(args.src)
        from mmray.data.sources import is_file

        if is_file(args.dest):  # it would hold train/, val/ and the manifest
            raise ValueError(f"DEST {args.dest} is a file; give a directory (or a new path) for the data set")
        if is_generator(args.src):
            _only_for(args, "folder and .csv/.jsonl sources", **{
                "--format": "format", "--tokenizer": "tokenizer", "--image-column": "image_column",
                "--caption-column": "caption_column"})
            return prepare_synthetic(args.dest, samples=args.samples or 10000, seed=args.seed,
                                     val_samples=args.val_samples, samples_per_shard=args.shard_size,
                                     image_size=args.image_size or 64, vocab_size=args.vocab_size,
                                     progress=log.info)
        from mmray.data.ingest import prepare_ingest

        _only_for(args, "generators (synthetic:shapes)", **{"--samples": "samples", "--image-size": "image_size"})
        return prepare_ingest(args.src, args.dest, format=args.format or "webdataset",
                              samples_per_shard=args.shard_size, val_samples=args.val_samples, seed=args.seed,
                              tokenizer=args.tokenizer, vocab_size=args.vocab_size, image_column=args.image_column,
                              caption_column=args.caption_column, progress=log.info)
    except ValueError as e:  # bad source, counts, columns or destination: the message names which
        raise config_lib.ConfigError(str(e)) from None


def cmd_data_inspect(args: argparse.Namespace) -> dict:
    from mmray.data.inspect import inspect
    from mmray.data.pipeline import reader_options

    cfg = _reader_config(args)
    log = logging.getLogger("mmray")
    return inspect(args.src, image_size=args.image_size, progress=log.info,
                   allow_missing=args.allow_missing_shards or cfg.data.allow_missing_shards,
                   reader=reader_options(cfg))


def _reader_config(args: argparse.Namespace) -> config_lib.Config:
    """The config of a data command that takes only the data-reading keys (and data.allow_missing_shards, which the
    missing-shard error suggests) as overrides (others: exit 2)."""
    from mmray.data.pipeline import READER_OVERRIDES

    keys = (*READER_OVERRIDES, "data.allow_missing_shards")
    return config_lib.with_overrides(config_lib.load(args.config), args.overrides, keys,
                                     allowed=f"the data-reading keys ({', '.join(keys)})")


def cmd_data_tokenizer(args: argparse.Namespace) -> dict:
    from mmray.data.pipeline import reader_options
    from mmray.data.vocab import train_from_shards

    cfg = _reader_config(args)
    try:
        return train_from_shards(args.src, args.out, vocab_size=args.vocab_size, max_samples=args.max_samples,
                                 reader=reader_options(cfg), overwrite=args.overwrite,
                                 allow_missing=args.allow_missing_shards or cfg.data.allow_missing_shards,
                                 progress=logging.getLogger("mmray").info)
    except ValueError as e:  # bad argument, existing OUT, no usable caption: the message names which
        raise config_lib.ConfigError(str(e)) from None


def cmd_model_list(args: argparse.Namespace) -> dict:
    from mmray.models.fusion import FUSIONS
    from mmray.models.presets import PRESETS

    for name, p in PRESETS.items():
        print(f"{name:8s} embed={p.embed_dim} vit={p.image_depth}x{p.image_width}/p{p.patch_size} "
              f"text={p.text_depth}x{p.text_width}", file=sys.stderr)
    for name, cls in FUSIONS.items():
        print(f"fusion {name:12s} provides: {', '.join(cls.provides)}", file=sys.stderr)
    return {"presets": list(PRESETS), "fusions": list(FUSIONS)}


def cmd_model_info(args: argparse.Namespace) -> dict:
    from mmray.models.info import model_info
    from mmray.models.presets import REFERENCE_INPUTS, Inputs

    reference = REFERENCE_INPUTS.get(args.preset, REFERENCE_INPUTS["tiny"])
    inputs = Inputs(image_size=args.image_size or reference.image_size,
                    context_length=args.context_length or reference.context_length,
                    vocab_size=args.vocab_size or reference.vocab_size)
    cfg = config_lib.from_dict({  # validated like a training config: bad preset, fusion or sizes exit 2
        "model": {"preset": args.preset, "fusion": args.fusion, "decoder_depth": args.decoder_depth},
        "data": {"image_size": inputs.image_size, "max_text_len": inputs.context_length}})
    return model_info(cfg.model, inputs)


def cmd_export(args: argparse.Namespace) -> dict:
    from mmray.export import export

    return export(args.source, args.out, dtype=args.dtype)


def cmd_eval(args: argparse.Namespace) -> dict:
    from mmray.eval.run import run_eval

    return run_eval(args.model, args.data, split=args.split, max_samples=args.max_samples,
                    overrides=args.overrides, progress=logging.getLogger("mmray").info)


EVAL_HELP = """\
Evaluate MODEL (an export directory from `mmray export`, a checkpoint directory, or a run directory, meaning its
newest complete checkpoint; local or s3://) on the data at --data, in data.source's forms: a prepared data set
(whose --split is used), a directory / s3:// prefix with shards (.tar, .tar.gz, .tgz, .tar.bz2, .tar.zst,
.tar.lz4 or .parquet) directly under it (img2dataset's layout), one shard file, a brace pattern
('s3://b/laion/{00000..00099}.tar'), or several of these joined by '::'.
A shard that a pattern or file names but storage lacks fails naming its path (data.allow_missing_shards=true skips
it). Shards are read with the model config's data-reading keys (data.image_extensions, data.caption_extension,
data.metadata_extension, data.image_column, data.caption_column), which may be overridden like eval.* keys.
The JSON summary's `metrics` hold what the model provides: retrieval i2t/t2i R@1, R@5, R@10 with chance levels and
zero-shot classification accuracy (late, attention), ITM accuracy (early, hierarchical, attention), caption loss,
BLEU-4 and CIDEr-D of greedy captions, and VQA exact-match accuracy overall, per question type and on the
compositional types (with a decoder). Bad samples are skipped and counted in `bad`, as in training.
"""


PREPARE_HELP = """\
Write SRC into DEST (a local directory or s3://bucket/prefix) as img2dataset-style shards: DEST/train/ and DEST/val/
(NNNNN.tar WebDataset shards with NNNNN_stats.json, or NNNNN.parquet), DEST/tokenizer.json (trained on the training
captions, or --tokenizer) and DEST/dataset.json, written last, with every shard's sample count and sha256.

SRC is one of:
  synthetic:shapes        generated images of coloured shapes with captions and QA pairs (--samples, --image-size)
  a folder                images (.jpg .jpeg .png .webp), searched recursively, each with a same-named .txt
                          caption and optionally a .json of metadata (cats/001.jpg + cats/001.txt)
  a .csv or .jsonl index  one image path and caption per row (--image-column, --caption-column); relative
                          paths are relative to the index file
Images are stored as their original bytes. Bad samples (no caption, missing or corrupt image, ...) are skipped and
counted per reason in the JSON summary. Validation takes --val-samples samples chosen by --seed.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mmray", description="Multimodal training on Ray Train + DeepSpeed. "
                                         "Logs go to stderr; the last stdout line is a JSON summary. "
                                         "Exit codes: 0 ok, 2 bad input, 1 other errors.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", help="YAML config file (see jobs/configs/ and `mmray config`)")
        sp.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides applied after the file, e.g. train.lr=3e-4 train.num_workers=1")

    train = sub.add_parser("train", help="train (or resume) a model", description=TRAIN_HELP)
    with_config(train)
    train.set_defaults(fn=cmd_train)

    cfg = sub.add_parser("config", help="print every config key with its default and meaning, "
                                        "or validate and resolve a config",
                         description="Without arguments, print every key with default and documentation. With "
                                     "--config and/or overrides, validate them and print the resolved tree.")
    with_config(cfg)
    cfg.set_defaults(fn=cmd_config)

    def shard_reading(sp: argparse.ArgumentParser) -> None:
        """The options of the data commands that read shards: which shards, and how they are read."""
        sp.add_argument("--allow-missing-shards", action="store_true",
                        help="skip shards a pattern names but storage lacks (default: fail naming the first)")
        sp.add_argument("--config", "-c", help="YAML config whose data-reading keys (and data.allow_missing_shards) "
                                               "apply, e.g. a training config")
        sp.add_argument("overrides", nargs="*", metavar="data.key=value",
                        help="how shards are read: data.image_extensions, data.caption_extension, "
                             "data.metadata_extension (WebDataset members), data.image_column, data.caption_column "
                             "(Parquet), e.g. data.caption_extension=caption")

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="write a data set as WebDataset or Parquet shards with its tokenizer",
                           description=PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_argument("src", help="synthetic:shapes, a folder of images with .txt captions, or a .csv / .jsonl "
                                  "index (local or s3://)")
    prep.add_argument("dest", help="local directory or s3://bucket/prefix")
    prep.add_argument("--format", choices=("webdataset", "parquet"), default=None,
                      help="shard format for folder and index sources (default webdataset)")
    prep.add_argument("--val-samples", type=int, default=None,
                      help="held-out validation samples (default min(max(256, samples/10), samples/2))")
    prep.add_argument("--seed", type=int, default=0,
                      help="generator seed / which samples go to validation; output is deterministic for a seed")
    prep.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    prep.add_argument("--tokenizer", default=None, metavar="PATH",
                      help="attach this tokenizer.json (local or s3://) instead of training one")
    prep.add_argument("--vocab-size", type=positive_int, default=512,
                      help="size of the tokenizer trained on the training captions (default 512)")
    prep.add_argument("--image-column", default=None,
                      help="index column/field of the image path (default image, else path, filepath, file_name)")
    prep.add_argument("--caption-column", default=None,
                      help="index column/field of the caption (default caption, else text)")
    prep.add_argument("--samples", type=positive_int, default=None,
                      help="synthetic:shapes only: total samples, train + val (default 10000)")
    prep.add_argument("--image-size", type=positive_int, default=None,
                      help="synthetic:shapes only: image side in pixels (default 64)")
    prep.set_defaults(fn=cmd_data_prepare)
    insp = data.add_parser("inspect", help="decode every sample of a data set and count the usable and bad ones",
                           description="Stream SRC through the real read and decode path. SRC is a prepared data "
                                       "set (both splits), a directory / s3:// prefix of shards (.tar, .tar.gz, "
                                       ".tgz, .tar.bz2, .tar.zst, .tar.lz4 or .parquet; img2dataset's layout), "
                                       "a shard file, a brace pattern ('s3://b/laion/{00000..00099}.tar'), or "
                                       "several joined by '::'. The JSON "
                                       "summary holds samples (usable), expected_samples (from the shards' "
                                       "_stats.json; null when a shard has none), bad (count per reason), "
                                       "bad_examples, shards, bytes and samples_per_s.")
    insp.add_argument("src", help="shards: prefix, file, brace pattern or '::'-joined list (local or s3://)")
    insp.add_argument("--image-size", type=positive_int, default=64, help="decode and resize to this side (default 64)")
    shard_reading(insp)
    insp.set_defaults(fn=cmd_data_inspect)
    tok = data.add_parser("tokenizer", help="train a tokenizer.json on the captions of shards that came without one",
                          description="Stream the training text of SRC (captions, and the questions and answers "
                                      "of a sample's metadata 'qa' list) through the real reader and train the BPE "
                                      "tokenizer that `mmray data prepare` trains, for shards written by other "
                                      "tools (img2dataset, webdataset). SRC takes every form of data.source; a "
                                      "prepared data set gives its train/ split only. Images are not decoded. "
                                      "Point data.tokenizer at OUT to train on SRC. The JSON summary holds "
                                      "tokenizer, vocab_size, samples, texts, capped (it stopped at "
                                      "--max-samples), bad (count per reason), bad_examples, shards and "
                                      "samples_per_s.")
    tok.add_argument("src", help="shards: prefix, file, brace pattern or '::'-joined list (local or s3://)")
    tok.add_argument("out", help="where to write tokenizer.json (local path or s3://bucket/key)")
    tok.add_argument("--vocab-size", type=positive_int, default=512, help="largest vocabulary to learn (default 512)")
    tok.add_argument("--max-samples", type=int, default=1_000_000,
                     help="train on the first N usable samples in shard order (default 1000000; 0: all)")
    tok.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    shard_reading(tok)
    tok.set_defaults(fn=cmd_data_tokenizer)

    model = sub.add_parser("model", help="model presets and fusion strategies").add_subparsers(
        dest="model_command", required=True)
    model.add_parser("list", help="list presets and fusion strategies").set_defaults(fn=cmd_model_list)
    info = model.add_parser("info", help="parameter counts per part and training FLOPs per sample of a preset",
                            description="Build PRESET on the meta device (no weights, no memory) and print its "
                                        "parameter counts (image encoder, text encoder, fusion, decoder, total) and "
                                        "the estimated training FLOPs per sample (see flops_method in the output). "
                                        "Inputs default to the preset's reference ones (224 px, 77 tokens, 49408 "
                                        "vocabulary for the CLIP presets).")
    info.add_argument("preset", metavar="PRESET", help="a preset name (see `mmray model list`)")
    info.add_argument("--fusion", default="late", help="fusion strategy (default late, the dual encoder)")
    info.add_argument("--decoder-depth", type=int, default=0, help="decoder blocks (default 0: none)")
    info.add_argument("--image-size", type=positive_int, default=None, help="image side in pixels")
    info.add_argument("--context-length", type=positive_int, default=None, help="text tokens")
    info.add_argument("--vocab-size", type=positive_int, default=None, help="vocabulary size")
    info.set_defaults(fn=cmd_model_info)

    exp = sub.add_parser("export", help="export a checkpoint as safetensors weights, config and tokenizer",
                         description="Consolidate the ZeRO shards of CHECKPOINT_OR_RUN_DIR (a run directory means its "
                                     "newest complete checkpoint) into OUT/model.safetensors, with config.yaml, "
                                     "tokenizer.json and manifest.json (sha256 of each file). OUT may be s3://. "
                                     "Load it with mmray.export.load(OUT).")
    exp.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR", help="a checkpoint_* directory or a run directory")
    exp.add_argument("out", metavar="OUT", help="output directory (local or s3://bucket/prefix)")
    exp.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype (default fp32)")
    exp.set_defaults(fn=cmd_export)

    ev = sub.add_parser("eval", help="evaluate an export or checkpoint on a data set", description=EVAL_HELP)
    ev.add_argument("model", metavar="MODEL", help="export directory, checkpoint directory or run directory")
    ev.add_argument("--data", required=True, metavar="SRC",
                    help="prepared data set, shard prefix, shard file, brace pattern or '::'-joined list "
                         "(local or s3://)")
    ev.add_argument("--split", default="val", choices=("val", "train"),
                    help="split of a prepared data set (default val); shards named directly are read whole")
    ev.add_argument("--max-samples", type=int, default=None,
                    help="evaluate at most this many samples (default: the model config's eval.max_samples; 0 = all)")
    ev.add_argument("overrides", nargs="*", metavar="eval.key=value",
                    help="evaluation settings, e.g. eval.generate=false eval.batch_size=128, and the data-reading "
                         "keys, e.g. data.caption_extension=caption data.allow_missing_shards=true")
    ev.set_defaults(fn=cmd_eval)

    from mmray.cost import commands as cost_commands
    from mmray.infer.commands import register as register_inference
    from mmray.node.commands import register as register_node_commands

    cost_commands.register(sub, with_config)
    from mmray.sweep import commands as sweep_commands

    sweep_commands.register(sub, with_config)
    register_inference(sub)  # embed, search, generate

    register_node_commands(sub)
    _verbose_anywhere(p)
    return p


def _verbose_anywhere(parser: argparse.ArgumentParser) -> None:
    """-v also after the subcommand (`mmray train -v`), as users type it; SUPPRESS keeps a subcommand's parser from
    resetting a -v given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in set(action.choices.values()):
                if "--verbose" not in sp._option_string_actions:
                    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                    help="debug logging")
                _verbose_anywhere(sp)


class CommandFailed(RuntimeError):
    """A command whose work ran but failed as a whole (every trial of a sweep): the CLI prints ``summary`` with the
    error and exits 1."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def run(fn: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> int:
    # Everything printed while the command works (including worker output that Ray forwards to the driver's
    # stdout) goes to stderr, so that stdout carries only the JSON summary line.
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        summary, code = fn(args), EXIT_OK
    except CommandFailed as e:  # the work ran and failed: its whole summary, with the error, and exit 1
        logging.getLogger("mmray").error("%s", e)
        summary, code = {**e.summary, "error": str(e), "kind": "error"}, EXIT_ERROR
    except _bad_input_types() as e:
        while isinstance(getattr(e, "cause", None), BaseException):  # raised in a Ray task: Ray's wrapper, whose
            e = e.cause  # text is the task's traceback; the message is the original error's
        logging.getLogger("mmray").error("%s", e)
        summary, code = {"error": str(e), "kind": "bad_input"}, EXIT_BAD_INPUT
    except KeyboardInterrupt:
        summary, code = {"error": "interrupted", "kind": "interrupted"}, EXIT_ERROR
    except Exception as e:  # the summary line must always come, even for bugs
        from mmray.storage import access_refused

        if (refused := access_refused(e)) is not None:  # credentials or a bucket policy: the user's to fix
            logging.getLogger("mmray").error("%s", refused)
            summary, code = {"error": refused, "kind": "bad_input"}, EXIT_BAD_INPUT
        else:
            logging.getLogger("mmray").error("%s", traceback.format_exc())
            summary, code = {"error": f"{type(e).__name__}: {e}", "kind": "error"}, EXIT_ERROR
    finally:
        sys.stdout = stdout
    _emit(summary)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow options (`mmray eval MODEL --data SRC eval.generate=false`), which argparse
    # alone leaves unrecognised after a positional.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        _leaf_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
