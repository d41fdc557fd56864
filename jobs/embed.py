"""`ray job submit` entrypoint for batch embedding: the same as `mmray embed`, joining the cluster in RAY_ADDRESS.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/embed.py s3://bucket/exports/run1 s3://bucket/data/shapes s3://bucket/embeddings/run1

Arguments are those of `mmray embed` (see `mmray embed --help`); the last stdout line is the JSON summary.
Resubmitting the same command resumes: shards already written to OUT are skipped.
"""
import sys

from mmray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
