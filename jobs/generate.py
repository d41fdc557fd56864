"""`ray job submit` entrypoint for batch captioning / VQA: the same as `mmray generate`, joining the cluster in
RAY_ADDRESS.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/generate.py s3://bucket/exports/run1 s3://bucket/data/shapes s3://bucket/captions/run1 \
        --task caption --beam 3 --format jsonl

Arguments are those of `mmray generate` (see `mmray generate --help`); the last stdout line is the JSON summary.
Resubmitting the same command resumes: shards already written to OUT are skipped.
"""
import sys

from mmray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
