"""The `mmray embed`, `mmray search` and `mmray generate` subcommands: parsing only, the work is in mmray.infer.

``register(sub)`` adds them to the ``mmray`` parser's subparsers, the way mmray.cli registers its own commands:
each sets ``fn``, a handler that returns the summary dict which mmray.cli.run prints as the last stdout line.
"""
from __future__ import annotations

import argparse
import logging
import re

from mmray.cli import positive_int
from mmray.infer import DEVICES, FORMATS, TASKS

EMBED_HELP = """\
Stream SRC (one or more prepared data sets, directories or s3:// prefixes of .tar / .parquet shards, shard
files, folders of images with same-named .txt captions, or .csv / .jsonl indexes of image path and caption; the
last two are written as shards under OUT/_staged once, as `mmray data prepare` would) through the exported model
EXPORT with Ray Data, on a pool of actors that each load the model once (one per GPU when the cluster has GPUs, else
CPU actors), and write one Parquet file per input shard to OUT with the columns key, shard, source (the original
image file of a staged folder or index), caption, image_embedding and text_embedding (L2-normalised list<float32>).
Only exports whose model.fusion keeps separate towers (late, attention) have embeddings. Bad samples are skipped and
counted as in training. Shards are read with the export's data-reading keys unless --set overrides them. Rerunning
resumes: shards already written to OUT are skipped. The JSON summary holds samples, bad (per reason), shards_written,
shards_skipped, samples_per_s and wall_s.
"""
SEARCH_HELP = """\
Brute-force cosine top-k over the embeddings that `mmray embed` wrote to OUT: text to image with a QUERY text,
image to text with --image PATH (rows with the same caption count once). The query is embedded by the export named
in OUT's manifest (or --export). Prints the hits (key, caption, score, shard) as JSON; --contact-sheet writes a PNG
grid of the hits' images, read back from their source shards.
"""
GENERATE_HELP = """\
Generate text with the decoder of EXPORT for every usable sample of SRC (as for `mmray embed`), on a pool of
actors: --task caption writes one row per sample (key, shard, source, caption, generated), --task vqa one row per
question in each sample's JSON metadata (key, shard, source, question, answer, qa_type, generated). Greedy decoding
(--beam 1) or beam search. One Parquet or JSONL file per input shard in OUT; rerunning resumes.
"""


def _progress():
    return logging.getLogger("mmray").info


_OVERRIDE = re.compile(r"^([a-z_]+)\.[a-z_]+=")


def _no_overrides(args: argparse.Namespace) -> None:
    """ConfigError for a SRC or OUT that is a config override (``data.caption_extension=txt``): other commands take
    those after their arguments, these take them with --set; read as a path, the real OUT became one more SRC."""
    from mmray.config import SECTIONS, ConfigError

    for value in (*args.src, args.out):
        if (m := _OVERRIDE.match(value)) and m.group(1) in SECTIONS:
            raise ConfigError(f"{value!r} is given as SRC or OUT, but it is a config override: pass it as "
                              f"--set {value} (the data reading keys, see --help)")


def cmd_embed(args: argparse.Namespace) -> dict:
    from mmray.infer.embed import embed

    _no_overrides(args)

    return embed(args.export, args.src, args.out, batch_size=args.batch_size or 256, device=args.device,
                 actors=args.actors, cpus_per_actor=args.cpus_per_actor, max_bad_fraction=args.max_bad_fraction,
                 progress=_progress(), reader_overrides=args.set)


def cmd_search(args: argparse.Namespace) -> dict:
    from mmray.infer.search import search

    return search(args.out, text=args.query, image=args.image, k=args.k, export_dir=args.export,
                  contact_sheet=args.contact_sheet)


def cmd_generate(args: argparse.Namespace) -> dict:
    from mmray.infer.generate import generate

    _no_overrides(args)

    return generate(args.export, args.src, args.out, task=args.task, beam=args.beam,
                    max_new_tokens=args.max_new_tokens, fmt=args.format, batch_size=args.batch_size or 64,
                    device=args.device, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                    max_bad_fraction=args.max_bad_fraction, progress=_progress(), reader_overrides=args.set)


def _with_inputs_and_pool(sp: argparse.ArgumentParser, default_batch: int) -> None:
    sp.add_argument("export", metavar="EXPORT", help="export directory from `mmray export` (local or s3://)")
    sp.add_argument("src", metavar="SRC", nargs="+",
                    help="prepared data set, shard directory or shard file (local or s3://); several allowed")
    sp.add_argument("out", metavar="OUT", help="output directory (local or s3://bucket/prefix)")
    sp.add_argument("--batch-size", type=positive_int, default=None,
                    help=f"samples per model batch (default {default_batch})")
    sp.add_argument("--device", choices=DEVICES, default="auto",
                    help="auto (default): GPUs when the cluster has any, else CPUs")
    sp.add_argument("--actors", type=positive_int, default=None,
                    help="model actors (default: one per GPU, else one per CPU)")
    sp.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and threads) per CPU actor (default 1)")
    sp.add_argument("--max-bad-fraction", type=float, default=None,
                    help="stop when more than this fraction of samples is bad (default: the export's "
                         "data.max_bad_fraction)")
    sp.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                    help="read SRC's shards unlike the export's training data (repeatable): data.image_extensions, "
                         "data.caption_extension, data.metadata_extension (WebDataset members), data.image_column, "
                         "data.caption_column (Parquet), e.g. --set data.caption_extension=caption")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `embed`, `search` and `generate` to the subparsers ``sub`` of the `mmray` parser."""
    emb = sub.add_parser("embed", help="write image and text embeddings of a data set as Parquet, from an export",
                         description=EMBED_HELP)
    _with_inputs_and_pool(emb, 256)
    emb.set_defaults(fn=cmd_embed)

    srch = sub.add_parser("search", help="cosine top-k over embeddings written by `mmray embed`",
                          description=SEARCH_HELP)
    srch.add_argument("out", metavar="OUT", help="the OUT of `mmray embed`")
    srch.add_argument("query", metavar="QUERY", nargs="?", default=None, help="query text (text to image)")
    srch.add_argument("--image", metavar="PATH", default=None, help="query image file (image to text)")
    srch.add_argument("--k", type=positive_int, default=5, help="hits to return (default 5)")
    srch.add_argument("--export", metavar="EXPORT", default=None,
                      help="export that embeds the query (default: the one recorded in OUT's manifest)")
    srch.add_argument("--contact-sheet", metavar="PNG", default=None, help="write a PNG grid of the hits' images")
    srch.set_defaults(fn=cmd_search)

    gen = sub.add_parser("generate", help="captions or VQA answers for a data set, from an export",
                         description=GENERATE_HELP)
    _with_inputs_and_pool(gen, 64)
    gen.add_argument("--task", choices=TASKS, default="caption", help="what to generate (default caption)")
    gen.add_argument("--beam", type=positive_int, default=1, help="beam width; 1 (default) is greedy decoding")
    gen.add_argument("--max-new-tokens", type=positive_int, default=None,
                     help="longest generated text in tokens (default: the export's eval.max_new_tokens)")
    gen.add_argument("--format", choices=FORMATS, default="parquet", help="output format (default parquet)")
    gen.set_defaults(fn=cmd_generate)
