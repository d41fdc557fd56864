"""Every registered fusion strategy: the provides contract, ITM hard negatives, gradients, objectives in config."""
import pytest
import torch
import torch.nn.functional as F

from mmray import config
from mmray.losses import caption_loss, compute_losses
from mmray.models.fusion import FUSIONS, LateFusion, hardest_negatives, register_fusion
from mmray.models.model import IGNORE_INDEX, MultimodalModel
from mmray.models.objectives import OBJECTIVE_OUTPUTS, objective_weights

VOCAB, PAD, BOS, EOS, T, B = 60, 0, 2, 3, 12, 4
ITM_FUSIONS = [name for name, cls in FUSIONS.items() if "itm_logits" in cls.provides]


def _model(fusion, *overrides):
    torch.manual_seed(0)
    cfg = config.load(None, ["model.preset=tiny", f"model.fusion={fusion}", *overrides])
    return MultimodalModel(cfg.model, VOCAB, PAD, cfg.data.image_size, T), cfg


def _batch(n=B, seed=1):
    """Distinct captions [BOS] words [EOS] of different lengths, right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, T), PAD)
    for i in range(n):
        length = 4 + i % 5
        ids[i, 0], ids[i, 1:length + 1], ids[i, length + 1] = BOS, torch.randint(4, VOCAB, (length,), generator=g), EOS
    return torch.randn(n, 3, 64, 64, generator=g), ids


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_outputs_follow_the_provides_contract(fusion):
    model, cfg = _model(fusion, "model.decoder_depth=1")
    images, ids = _batch()
    out = model(images, ids)
    trained = objective_weights(cfg.model)
    assert set(out) == {key for name in trained for key in OBJECTIVE_OUTPUTS[name]}
    assert set(out) - set(OBJECTIVE_OUTPUTS["caption"]) <= set(FUSIONS[fusion].provides)
    assert "caption" in trained and "memory" in FUSIONS[fusion].provides
    if "itm" in trained:
        assert out["itm_logits"].shape == (3 * B, 2) and out["itm_labels"].shape == (3 * B,)
    if "contrastive" in trained:
        assert out["image_embeds"].shape == out["text_embeds"].shape == (B, cfg.model.embed_dim)
    assert out["caption_logits"].shape == (B, T - 1, VOCAB)
    assert torch.equal(out["caption_targets"], ids[:, 1:].masked_fill(ids[:, 1:] == PAD, IGNORE_INDEX))
    image = model.fusion.encode_image(images)
    streams = model.fusion.memory(image, model.fusion.encode_text(ids[:, :1]))
    assert tuple(x.shape[-1] for x, _ in streams) == model.fusion.memory_widths
    memory, mask = model.memory(image, ids[:, :1])
    assert memory.shape[::2] == (B, cfg.model.text_width) and mask.shape == memory.shape[:2]


def test_hardest_negative_is_the_most_similar_different_caption():
    ids = torch.tensor([[BOS, 10, 11, 12, EOS, PAD],
                        [BOS, 10, 11, 13, EOS, PAD],     # one word from row 0: its hardest negative
                        [BOS, 20, 21, 22, 23, EOS],
                        [BOS, 10, 11, 12, EOS, PAD]])    # the same caption as row 0: never its negative
    neg = hardest_negatives(ids, PAD, 30)
    assert neg[0] == 1 and neg[3] == 1 and neg[1] in (0, 3)
    assert not (ids[neg] == ids).all(-1).any(), "a mined negative is always a different caption"


@pytest.mark.parametrize("fusion", ITM_FUSIONS)
def test_itm_pairs_are_one_positive_and_two_real_negatives(fusion):
    model, _ = _model(fusion)
    images, ids = _batch()
    out = model(images, ids)
    assert out["itm_labels"].tolist() == [1] * B + [0] * (2 * B)
    duplicates = ids[:1].repeat(B, 1)          # nothing to mine: the label says the pair matches, honestly
    assert model(images, duplicates)["itm_labels"].tolist() == [1] * (3 * B)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_every_parameter_gets_a_gradient_and_both_towers_learn(fusion):
    """Unused parameters break DeepSpeed's gradient partitioning; a tower without gradient would not learn."""
    model, _ = _model(fusion, "model.decoder_depth=1")
    compute_losses(model(*_batch()))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    for tower in (model.image_encoder, model.text_encoder):
        assert sum(p.grad.abs().sum() for p in tower.parameters()) > 0


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_the_loop_call_trains_what_the_strategy_provides(fusion):
    """The training loop calls compute_losses(outputs) without weights: the default (auto) weights must hold."""
    for decoder in (0, 1):
        model, cfg = _model(fusion, f"model.decoder_depth={decoder}")
        terms = compute_losses(model(*_batch()))
        assert set(terms) - {"loss"} == set(objective_weights(cfg.model))
        assert torch.isfinite(terms["loss"])


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_caption_memory_never_sees_the_caption(fusion):
    """Teacher-forced logits before position t do not change when token t changes (causal decoder, BOS-only memory)."""
    model, _ = _model(fusion, "model.decoder_depth=1")
    model.eval()
    images, ids = _batch()
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 7) % (VOCAB - 4) + 4
    a, b = model(images, ids)["caption_logits"], model(images, changed)["caption_logits"]
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-5)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_generate_captions(fusion):
    model, _ = _model(fusion, "model.decoder_depth=1")
    out = model.eval().generate(_batch()[0], BOS, EOS, max_new_tokens=5, beam_width=2)
    assert out.dtype == torch.long and out.shape[0] == B and 1 <= out.shape[1] <= 5


def test_weights_scale_and_skip_terms():
    model, _ = _model("attention")
    out = model(*_batch())
    plain = compute_losses(out)
    weighted = compute_losses(out, {"contrastive": 0.5, "itm": 2.0})
    expected = 0.5 * plain["contrastive"].item() + 2 * plain["itm"].item()
    assert weighted["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert set(compute_losses(out, {"contrastive": 0.0})) == {"itm", "loss"}


def test_caption_loss_ignores_padding():
    logits = torch.randn(2, 4, 9)
    targets = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX], [3, 4, 5, IGNORE_INDEX]])
    real = targets != IGNORE_INDEX
    assert caption_loss(logits, targets).item() == pytest.approx(F.cross_entropy(logits[real], targets[real]).item())


@pytest.mark.parametrize("overrides, names", [
    (["model.fusion=early", "model.contrastive_weight=1"], ["model.contrastive_weight", "model.fusion", "late"]),
    (["model.fusion=late", "model.itm_weight=0.5"], ["model.itm_weight", "model.fusion"]),
    (["model.caption_weight=1"], ["model.caption_weight", "model.decoder_depth"]),
    (["model.contrastive_weight=0"], ["no objective", "model.contrastive_weight", "model.decoder_depth"]),
    (["model.itm_weight=-0.5"], ["model.itm_weight", "-1 (auto)"]),
    (["model.fusion=hierarchical", "model.fusion_layers=0,5"], ["model.fusion_layers", "model.text_depth"]),
    (["model.fusion=hierarchical", "model.fusion_layers=a"], ["model.fusion_layers"]),
])
def test_config_rejects_objectives_the_strategy_cannot_provide(overrides, names):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, overrides)
    for name in names:
        assert name in str(err.value)


def test_a_fifth_strategy_is_one_registry_entry():
    @register_fusion("test-late-copy")
    class Copy(LateFusion):
        pass
    try:
        cfg = config.load(None, ["model.fusion=test-late-copy"])
        model = MultimodalModel(cfg.model, VOCAB, PAD, cfg.data.image_size, T)
        assert set(compute_losses(model(*_batch()))) == {"contrastive", "loss"}
    finally:
        del FUSIONS["test-late-copy"]


def test_attention_both_ways_lets_the_image_attend_to_the_text():
    images, ids = _batch()
    for both, image_sees_text in ((False, False), (True, True)):
        model, _ = _model("attention", f"model.cross_attention_both_ways={str(both).lower()}")
        image = model.fusion.encode_image(images)
        fused = [model.fusion.fuse(image, model.fusion.encode_text(t))["memory"][0][0] for t in (ids, ids.flip(0))]
        assert torch.allclose(*fused) is not image_sees_text
