"""Fine-tuning: pretrained towers (strict keys, weights-only files, prefixes, export directories), freezing, and
layer-wise learning-rate decay through DeepSpeed's scheduler. Tiny models, no Ray, no process group."""
import hashlib
import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmray import config
from mmray.config import ConfigError
from mmray.losses import compute_losses
from mmray.models import pretrained
from mmray.models.model import MultimodalModel
from mmray.train.engine import build_model, check_finetune, layer_ids, param_groups

VOCAB, PAD = 50, 0
TINY = ["model.image_depth=2", "model.text_depth=1", "model.image_width=32", "model.text_width=32",
        "model.image_heads=2", "model.text_heads=2", "model.embed_dim=16", "data.image_size=16",
        "model.patch_size=8", "data.max_text_len=8"]


def _cfg(*overrides):
    return config.load(None, [*TINY, *overrides])


def _model(seed=0, *overrides):
    torch.manual_seed(seed)
    return build_model(_cfg(*overrides), VOCAB, PAD, world=1, on_gpu=False)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_whole_model_file_initialises_one_tower_with_auto_prefix(tmp_path):
    source = _model(seed=1)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    model = _model(2, f"model.init_image={path}")
    assert _same(model.image_encoder, source.image_encoder)
    assert not _same(model.text_encoder, source.text_encoder)  # only the image tower came from the file


@pytest.mark.parametrize("prefix", ["", "visual."])
def test_tower_file_with_explicit_prefix(tmp_path, prefix):
    source = _model(seed=1)
    path = tmp_path / "tower.safetensors"
    pretrained.save_tower(source, "text", str(path), prefix=prefix)
    if prefix:  # keys outside the prefix are ignored, not unexpected
        save_file({**load_file(str(path)), "other.weight": torch.zeros(2)}, str(path))

    model = _model(2, f"model.init_text={path}", f"model.init_text_prefix={prefix}")
    assert _same(model.text_encoder, source.text_encoder)


def test_mismatched_file_reports_missing_unexpected_and_shapes_at_once(tmp_path):
    state = {k: v.clone() for k, v in _model().image_encoder.state_dict().items()}
    del state["transformer.blocks.1.mlp.fc.bias"]
    state["transformer.blocks.2.mlp.fc.bias"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 9, 32)  # model: (1, 5, 32) at 16 px with 8 px patches
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))

    with pytest.raises(ConfigError) as err:
        _model(0, f"model.init_image={path}")
    msg = str(err.value)
    assert "model.init_image" in msg and str(path) in msg
    assert "missing from the file (1): transformer.blocks.1.mlp.fc.bias" in msg
    assert "unexpected in the file (1): transformer.blocks.2.mlp.fc.bias" in msg
    assert "pos_embed: file [1, 9, 32] vs model [1, 5, 32]" in msg


def test_wrong_prefix_and_missing_file_are_config_errors(tmp_path):
    path = tmp_path / "tower.safetensors"
    pretrained.save_tower(_model(), "image", str(path))
    with pytest.raises(ConfigError, match="no key of .* starts with 'visual.'.*model.init_image_prefix"):
        _model(0, f"model.init_image={path}", "model.init_image_prefix=visual.")
    with pytest.raises(ConfigError, match="neither a weights file nor an mmray export"):
        _model(0, f"model.init_image={tmp_path / 'nope.safetensors'}")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file: code execution
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_torch_files_load_weights_only_and_pickled_code_is_refused(tmp_path):
    source = _model(seed=1)
    good = tmp_path / "tower.pt"
    torch.save({"state_dict": source.image_encoder.state_dict()}, good)  # a common checkpoint layout
    assert _same(_model(2, f"model.init_image={good}").image_encoder, source.image_encoder)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"pos_embed": _Evil(str(marker))}, evil)
    with pytest.raises(ConfigError, match="refusing to load .*evil.pt.*weights_only=True"):
        _model(0, f"model.init_image={evil}")
    assert not marker.exists()


def _fake_export(directory: pathlib.Path, model) -> pathlib.Path:
    """What mmray.export writes: model.safetensors (the whole model) and a manifest with its size and sha256."""
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    blob = (directory / "model.safetensors").read_bytes()
    manifest = {"files": {"model.safetensors": {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_export_directory_source_takes_that_towers_keys(tmp_path):
    source = _model(seed=1)
    export = _fake_export(tmp_path / "export", source)
    model = _model(2, f"model.init_text={export}", f"model.init_image={export}")
    assert _same(model.text_encoder, source.text_encoder) and _same(model.image_encoder, source.image_encoder)

    weights = export / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # same size, altered content
    weights.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="does not match its sha256"):
        _model(0, f"model.init_text={export}")
    (export / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="unfinished mmray export"):
        _model(0, f"model.init_text={export}")


def test_driver_check_reads_headers_only(tmp_path):
    """check_finetune builds the model on the meta device and reads only the file's header: a driver can afford it
    for any preset before a worker starts."""
    path = tmp_path / "tower.safetensors"
    pretrained.save_tower(_model(), "image", str(path))
    check_finetune(_cfg(f"model.init_image={path}", "model.freeze=text"), VOCAB, PAD)
    with pytest.raises(ConfigError, match="shape mismatch"):
        check_finetune(_cfg(f"model.init_image={path}", "model.image_width=64"), VOCAB, PAD)


def test_frozen_tower_is_outside_the_optimizer_and_does_not_move():
    model = _model(0, "model.freeze=text")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"fusion.text_encoder.{n}" for n, _ in model.text_encoder.named_parameters()}
    groups = param_groups(model, weight_decay=0.1)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.text_encoder.parameters()}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    images, ids = torch.randn(4, 3, 16, 16), torch.randint(1, VOCAB, (4, 8))
    compute_losses(model(images, ids))["loss"].backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_freeze_names_towers_and_refuses_to_freeze_everything():
    with pytest.raises(ConfigError, match="model.freeze: 'vision' is not a tower"):
        _cfg("model.freeze=vision")

    class TowersOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder, self.text_encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.cfg = _cfg().model

    with pytest.raises(ConfigError, match="leaves no parameter to train"):
        pretrained.freeze(TowersOnly(), ("image", "text"))


def test_layer_ids_follow_each_towers_depth():
    model = _model(0, "model.image_depth=3", "model.text_depth=2")
    ids = layer_ids(model)
    assert ids["fusion.image_encoder.patch_embed.weight"] == (0, 3)
    assert ids["fusion.image_encoder.ln_pre.weight"] == (0, 3)
    assert ids["fusion.image_encoder.transformer.blocks.2.mlp.fc.weight"] == (3, 3)
    assert ids["fusion.image_encoder.ln_post.weight"] == (4, 3)
    assert ids["fusion.text_encoder.token_embed.weight"] == (0, 2)
    assert ids["fusion.text_encoder.transformer.blocks.0.attn.qkv.weight"] == (1, 2)
    assert "fusion.image_proj.weight" not in ids and "fusion.logit_scale" not in ids
    assert len(param_groups(model, 0.1)) == 2  # layer_decay 1: the decay / no-decay pair, as before


def test_layer_decay_ratios_survive_deepspeeds_warmup_cosine_schedule():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    decay, lr = 0.5, 1e-3
    model = _model(0, "model.image_depth=3", "model.text_depth=2", "model.freeze=text")
    groups = param_groups(model, 0.1, layer_decay=decay, lr=lr)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["fusion.image_encoder.pos_embed"])] == decay ** 4
    assert scale_of[id(named["fusion.image_encoder.transformer.blocks.0.attn.qkv.weight"])] == decay ** 3
    assert scale_of[id(named["fusion.image_encoder.transformer.blocks.2.attn.qkv.weight"])] == decay
    assert scale_of[id(named["fusion.image_encoder.ln_post.weight"])] == 1.0
    assert scale_of[id(named["fusion.image_proj.weight"])] == 1.0
    assert groups[0]["lr_scale"] == 1.0 and groups[0]["weight_decay"] == 0.1  # the lr the loop logs

    opt = torch.optim.AdamW(groups, lr=lr)
    sched = WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=3, warmup_type="linear", cos_min_ratio=0.1)
    seen = []
    for _ in range(6):  # through warm-up into the cosine decay
        opt.step()
        sched.step()
        base = opt.param_groups[0]["lr"]
        seen.append(base)
        for g in opt.param_groups:
            assert math.isclose(g["lr"], base * g["lr_scale"], rel_tol=1e-12)
    assert len(set(seen)) == len(seen) and 0.9 * lr < max(seen) <= lr  # the schedule did move
