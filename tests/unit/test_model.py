"""Model shapes, causal masking and single-device purity."""
import ast
from pathlib import Path

import pytest
import torch

from mmray import config
from mmray.models.fusion import FUSIONS
from mmray.models.layers import MultiHeadAttention
from mmray.models.model import MultimodalModel

MODELS_DIR = Path(__file__).resolve().parents[2] / "mmray" / "models"


def _model(preset="tiny", fusion="late", vocab=100, pad_id=0):
    cfg = config.load(None, [f"model.preset={preset}", f"model.fusion={fusion}"])
    return MultimodalModel(cfg.model, vocab, pad_id, cfg.data.image_size, cfg.data.max_text_len), cfg


CPU_PRESETS = ["tiny", "small"]  # the CLIP-sized presets are built on the meta device in test_presets.py
CONTRASTIVE_FUSIONS = [name for name, cls in FUSIONS.items() if "image_embeds" in cls.provides]


@pytest.mark.parametrize("preset", CPU_PRESETS)
@pytest.mark.parametrize("fusion", CONTRASTIVE_FUSIONS)
def test_output_shapes_and_norms(preset, fusion):
    torch.manual_seed(0)
    model, cfg = _model(preset, fusion)
    images = torch.randn(3, 3, cfg.data.image_size, cfg.data.image_size)
    ids = torch.randint(1, 100, (3, 10))
    out = model(images, ids)
    assert out["image_embeds"].shape == (3, cfg.model.embed_dim)
    assert out["text_embeds"].shape == (3, cfg.model.embed_dim)
    assert torch.allclose(out["image_embeds"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / cfg.model.temperature_init, rel=1e-4)


def test_text_encoder_is_causal():
    torch.manual_seed(0)
    model, _ = _model()
    enc = model.text_encoder.eval()
    ids = torch.randint(1, 100, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] % 98) + 1
    a, b = enc(ids)["tokens"], enc(changed)["tokens"]
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6), "positions before 7 must not see token 7"
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4), "positions from 7 on must see it"


def test_padding_does_not_change_the_text_embedding():
    torch.manual_seed(0)
    model, _ = _model()
    enc = model.text_encoder.eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0, 0, 0]])
    longer = torch.tensor([[5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert torch.allclose(enc(ids)["pooled"], enc(longer)["pooled"], atol=1e-6)
    assert torch.allclose(enc(ids)["pooled"], enc(ids[:, :4])["pooled"], atol=1e-6)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).split(16, dim=-1)
    q, k, v = (t.view(2, 5, 4, 4).transpose(1, 2) for t in (q, k, v))
    mask = torch.ones(5, 5).tril().bool()
    w = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask, float("-inf")).softmax(-1)
    expected = attn.out((w @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x, causal=True), expected, atol=1e-5)


def test_image_size_must_match_patches():
    model, cfg = _model()
    out = model(torch.randn(1, 3, 64, 64), torch.ones(1, 4, dtype=torch.long))
    assert out["image_embeds"].shape == (1, cfg.model.embed_dim)


def test_model_code_is_single_device():
    """Model code imports neither Ray, DeepSpeed nor torch.distributed (collectives live in losses and train)."""
    for path in MODELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("ray", "deepspeed", "torch.distributed")), f"{path.name} imports {name}"


def _vqa_model(fusion, *extra):
    cfg = config.load(None, [f"model.fusion={fusion}", "model.decoder_depth=1", "model.vqa_weight=1",
                             "model.image_width=32", "model.text_width=32", "model.embed_dim=16",
                             "model.image_heads=2", "model.text_heads=2", "model.image_depth=1", "model.text_depth=1",
                             *extra])
    torch.manual_seed(0)
    return MultimodalModel(cfg.model, 50, 0, cfg.data.image_size, cfg.data.max_text_len), cfg


@pytest.mark.parametrize("fusion, extra", [("late", "model.late_combine=concat"), ("late", "model.late_combine=gated"),
                                           ("early", ""), ("hierarchical", ""), ("attention", "")])
def test_vqa_answers_come_from_the_image_fused_with_the_question(fusion, extra):
    model, cfg = _vqa_model(fusion, *([extra] if extra else []))
    S = cfg.data.image_size
    images, ids = torch.randn(2, 3, S, S), torch.randint(1, 50, (2, 12))
    questions, answers = torch.randint(1, 50, (2, 12)), torch.tensor([[1, 7, 2, 0], [1, 9, 9, 2]])
    out = model(images, ids, questions, answers)
    assert out["vqa_logits"].shape == (2, 3, 50)
    assert out["vqa_targets"].tolist() == [[7, 2, -100], [9, 9, 2]]  # padding is ignored
    # The answer depends on the question: another question, another distribution.
    other = model(images, ids, torch.randint(1, 50, (2, 12)), answers)["vqa_logits"]
    assert not torch.allclose(other, out["vqa_logits"])
    generated = model.generate(images, bos_id=1, eos_id=2, max_new_tokens=3, prompt_ids=questions)
    assert generated.shape[0] == 2 and generated.shape[1] <= 3


def test_vqa_needs_a_decoder_and_a_batch_without_questions_costs_nothing():
    from mmray.losses import vqa_loss

    with pytest.raises(config.ConfigError, match="vqa objective, which needs a decoder"):
        _vqa_model("attention", "model.decoder_depth=0")
    logits = torch.randn(2, 3, 50, requires_grad=True)
    loss = vqa_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_weight_init_scales_with_fan_in():
    """GPT-2's std 0.02 holds at a fan-in of 768 only; a 64-wide layer gets 0.02 * sqrt(768 / 64), so that stacked
    narrow layers pass on their input's scale instead of shrinking it 6-fold each (see mmray.models.model.init_std)."""
    torch.manual_seed(0)
    model, cfg = _model("tiny", "late")
    width = cfg.model.text_width
    mlp = model.fusion.text_encoder.transformer.blocks[0].mlp
    fc1, fc2 = mlp.fc, mlp.proj
    assert fc1.in_features == width and fc2.in_features == int(width * cfg.model.mlp_ratio)
    assert fc1.weight.std().item() == pytest.approx(0.02 * (768 / width) ** 0.5, rel=0.05)
    assert fc2.weight.std().item() == pytest.approx(0.02 * (768 / fc2.in_features) ** 0.5, rel=0.05)
    patch = model.fusion.image_encoder.patch_embed  # a conv: fan-in = 3 channels x patch x patch
    assert patch.weight.std().item() == pytest.approx(0.02 * (768 / (3 * cfg.model.patch_size ** 2)) ** 0.5, rel=0.1)
    assert float(fc1.bias.abs().max()) == 0.0
    assert model.fusion.text_encoder.token_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
