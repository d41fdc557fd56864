"""`ray job submit` entrypoint for training: the same as `mmray train`, joining the cluster in RAY_ADDRESS.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/quickstart.yaml train.lr=1e-3

Arguments are those of `mmray train` (see `mmray train --help`); the last stdout line is the JSON summary.
"""
import sys

from mmray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
