"""The table a finished sweep wrote (importable by the sweep tests: pytest puts this folder on sys.path)."""
import csv
from pathlib import Path

from mmray.sweep.report import RESULTS_CSV


def results_rows(spec) -> list[dict]:
    """The rows of the sweep's results.csv, one per trial, as the strings the file holds."""
    with open(Path(spec.sweep_dir) / RESULTS_CSV) as f:
        return list(csv.DictReader(f))
