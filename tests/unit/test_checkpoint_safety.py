"""Checkpoint files are loaded weights-only: a malicious pickle never runs code."""
import os
import pickle

import pytest
import torch

from mmray.train.engine import load_checkpoint_file


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "evil": _Exploit(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system|Unsupported global"):
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_plain_tensors_and_deepspeed_scaler_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0), "scaler": LossScaler(scale=1.0), "step": 3}, path)
    loaded = load_checkpoint_file(str(path))
    assert torch.equal(loaded["w"], torch.arange(3.0)) and loaded["step"] == 3
    assert loaded["scaler"].loss_scale == 1.0


def test_export_into_a_file_is_refused_before_any_work(tmp_path):
    """OUT is checked before the checkpoint is even looked for (consolidating a large one takes minutes)."""
    from mmray.export import ExportError, export

    target = tmp_path / "model.out"
    target.write_text("not a directory")
    with pytest.raises(ExportError, match=f"cannot export to {target}: OUT is a file"):
        export(str(tmp_path / "no-such-run"), str(target))
    with pytest.raises(ExportError, match=f"cannot export to {target}/v1: {target}, above OUT, is a file"):
        export(str(tmp_path / "no-such-run"), str(target / "v1"))
    with pytest.raises(ExportError, match=f"{tmp_path}/no-such-run does not exist"):
        export(str(tmp_path / "no-such-run"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="empty is neither a checkpoint nor a run directory"):
        export(str(tmp_path / "empty"), str(tmp_path / "out"))


def test_an_export_of_the_same_weights_is_the_same_bytes():
    """safetensors writes its metadata in hash order (a new order on each call); exports must not depend on it."""
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import load

    from mmray.export import _to_safetensors

    state = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(3), "steps": torch.tensor([7])}
    metadata = {"format": "pt", "step": "4", "source": "/runs/x/checkpoint_00000004", "dtype": "fp32"}
    files = {_to_safetensors(state, torch.float32, metadata) for _ in range(12)}
    assert len(files) == 1
    (data,) = files
    loaded = load(data)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        with safe_open(f.name, "pt") as opened:
            assert opened.metadata() == metadata
