"""The README's two opening commands stay true: CI runs the second verbatim, and the documented config keys exist."""
import re
from pathlib import Path

from mmray import config

REPO = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text())


def test_readme_opens_with_install_and_train_then_install_and_test():
    first, second = _readme_commands()[:2]
    assert first.startswith("pip install torch==2.13.0") and first.endswith("mmray train")
    assert second.startswith("pip install torch==2.13.0") and "pytest" in second


def test_ci_runs_the_readme_test_command_verbatim():
    second = _readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert second in ci


def test_readme_mentions_only_real_config_keys():
    keys = set(config.all_keys())
    text = (REPO / "README.md").read_text()
    mentioned = set(re.findall(r"(?<![\w./])(?:data|model|train|eval|run)\.[a-z_]+\b(?!\.py)", text))
    assert "train.lrr" in mentioned  # the README's typo example; everything else must be a real key
    file_names = {"model.safetensors"}
    assert mentioned - {"train.lrr"} - file_names <= keys, mentioned - keys


def test_eval_split_takes_only_the_splits_a_prepared_data_set_has(capsys):
    import pytest

    from mmray import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "model", "--data", "ds", "--split", "nosuch"])
    assert exit_info.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err
