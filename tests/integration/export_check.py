"""Export checks shared by the checkpoint tests and the ZeRO-3 training run (importable: pytest puts this folder on
sys.path): an export holds the consolidated training weights bit for bit and loads into the same model."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmray.export import build_model, load


def reference_state(checkpoint: Path) -> dict:
    """DeepSpeed's own consolidation, unpatched (these files are our own, so the unsafe loader is acceptable here)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")


def fixed_batch(cfg):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
    ids = torch.randint(1, 20, (4, cfg.data.max_text_len), generator=g)
    return images, ids


def assert_export_matches(export_dir: Path, reference: dict):
    exported = load_file(str(export_dir / "model.safetensors"))
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], tensor), name  # bit for bit

    model, cfg, tokenizer = load(str(export_dir))
    ref_model = build_model(cfg, tokenizer)
    ref_model.load_state_dict(reference, strict=True)
    ref_model.eval()
    with torch.no_grad():
        got, want = model(*fixed_batch(cfg)), ref_model(*fixed_batch(cfg))
    for key in want:
        assert torch.equal(got[key], want[key]), key
