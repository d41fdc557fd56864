"""Presets: published CLIP parameter counts, every preset builds with every fusion, and `mmray model info`."""
import dataclasses
import json

import pytest

from mmray import cli, config
from mmray.models.fusion import FUSIONS
from mmray.models.info import build_on_meta, parameter_counts, train_flops_per_sample
from mmray.models.presets import PRESETS, PUBLISHED_PARAMS, REFERENCE_INPUTS, TINY, VIT_B_16, VIT_B_32


@pytest.mark.parametrize("preset", list(PUBLISHED_PARAMS))
def test_dual_encoder_parameter_counts_match_the_published_ones(preset):
    counts = parameter_counts(build_on_meta(PRESETS[preset], REFERENCE_INPUTS[preset]))
    assert counts["total"] == pytest.approx(PUBLISHED_PARAMS[preset], rel=0.005)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_every_preset_builds_with_every_fusion(preset, fusion):
    cfg = dataclasses.replace(PRESETS[preset], fusion=fusion, decoder_depth=1)
    counts = parameter_counts(build_on_meta(cfg, REFERENCE_INPUTS[preset]))
    assert counts["image_encoder"] + counts["text_encoder"] + counts["fusion"] + counts["decoder"] == counts["total"]
    assert min(counts.values()) > 0


def test_presets_are_derived_and_resolve_through_the_config():
    assert set(PRESETS) == set(REFERENCE_INPUTS)
    assert dataclasses.replace(VIT_B_32, preset="ViT-B-16", patch_size=16) == VIT_B_16
    for name, preset in PRESETS.items():
        inputs = REFERENCE_INPUTS[name]
        cfg = config.load(None, [f"model.preset={name}", f"data.image_size={inputs.image_size}"])
        assert cfg.model == preset
    assert TINY == config.ModelConfig(), "tiny is the default model section"


def test_flops_are_close_to_six_times_params_times_tokens():
    """A cross-check of the counted FLOPs with the usual 6 N T estimate, per tower, on a dual encoder."""
    inputs = REFERENCE_INPUTS["ViT-B-32"]
    model = build_on_meta(VIT_B_32, inputs)
    non_embedding = {  # parameters used once per token: the Transformer blocks
        "image": sum(p.numel() for p in model.image_encoder.transformer.parameters()),
        "text": sum(p.numel() for p in model.text_encoder.transformer.parameters())}
    tokens = {"image": 1 + (inputs.image_size // VIT_B_32.patch_size) ** 2, "text": inputs.context_length}
    estimate = sum(6 * non_embedding[k] * tokens[k] for k in tokens)
    assert train_flops_per_sample(model, inputs) == pytest.approx(estimate, rel=0.15)


def _run_cli(capsys, *argv):
    code = cli.main(["model", *argv])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_model_info_prints_counts_and_flops(capsys):
    code, summary = _run_cli(capsys, "info", "ViT-B-32")
    assert code == 0
    assert summary["parameters"]["total"] == pytest.approx(151.28e6, rel=0.005)
    assert summary["parameters"]["decoder"] == 0 and summary["inputs"]["image_size"] == 224
    assert summary["train_flops_per_sample"] > 6 * 151e6 * 50 / 2 and "flops_method" in summary

    code, summary = _run_cli(capsys, "info", "tiny", "--fusion", "early", "--decoder-depth", "2")
    assert code == 0 and summary["fusion"] == "early" and summary["parameters"]["decoder"] > 0


@pytest.mark.parametrize("argv", [["info", "ViT-B-99"], ["info", "tiny", "--fusion", "nope"],
                                  ["info", "ViT-L-14", "--image-size", "64"]])
def test_model_info_bad_input_exits_2(capsys, argv):
    code, summary = _run_cli(capsys, *argv)
    assert code == 2 and summary["kind"] == "bad_input"


def test_model_list_prints_presets_and_fusions(capsys):
    code, summary = _run_cli(capsys, "list")
    assert code == 0 and summary == {"presets": list(PRESETS), "fusions": list(FUSIONS)}
