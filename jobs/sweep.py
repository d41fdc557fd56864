"""`ray job submit` entrypoint for sweeps: the same as `mmray sweep`, joining the cluster in RAY_ADDRESS.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py --config jobs/configs/sweep-fusion.yaml sweep.budget.usd=20

Arguments are those of `mmray sweep` (see `mmray sweep --help`; `--resume` continues an interrupted sweep); the last
stdout line is the JSON summary.
"""
import sys

from mmray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
