"""Batch inference from an export (see mmray.export): embed a data set, search the embeddings, generate captions.

- ``inputs``: the shards of SRC, read with one end-of-shard row each, decoded as in training;
- ``outputs``: one output file per input shard, written atomically, with a completion record for resuming;
- ``runner``: the export's config without its weights, Ray, the actor pool, and the driver loop;
- ``embed``, ``generate``, ``search``: the three commands' library functions; ``commands``: their argparse parts.
"""

# Choices shared by the library and the command line (kept here so that `mmray --help` imports nothing heavy).
DEVICES = ("auto", "cpu", "gpu")
FORMATS = ("parquet", "jsonl")
TASKS = ("caption", "vqa")
