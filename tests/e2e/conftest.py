"""Helpers for end-to-end tests: run the real `mmray` console script in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        try:
            self.summary = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:  # --help and argparse errors print text, not a summary
            self.summary = None


@pytest.fixture
def mmray(tmp_path):
    """Run `mmray ARGS` with a private HOME-like cache, returning exit code, output and the parsed summary line."""

    def run(*args: str, timeout: float = 600, env: dict | None = None) -> Run:
        full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "mmray.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=tmp_path)
        return Run(proc)

    return run
