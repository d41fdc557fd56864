"""Which training objectives a model config trains, and with which weights.

An objective is computed from named model outputs (``OBJECTIVE_OUTPUTS``). A fusion strategy declares the outputs
it can produce in ``provides``; ``caption`` additionally needs a decoder (``model.decoder_depth > 0``) over the
strategy's ``memory``, and so does ``vqa`` (the decoder generates the answer from the image fused with the question). Each objective has a weight key in the model section; ``-1`` (the default) means *auto*:
1.0 where the chosen strategy can provide the objective, 0 elsewhere. So ``model.fusion=early`` trains image-text
matching without further keys, and asking for an objective that cannot be provided is a ConfigError that names the
keys. The model computes only the outputs of objectives with a positive weight (ITM negatives cost two extra fusion
passes), so the outputs present are exactly the objectives to train.
"""
from __future__ import annotations

from mmray.config import ConfigError, ModelConfig

AUTO = -1.0
OBJECTIVE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "contrastive": ("image_embeds", "text_embeds", "logit_scale"),
    "itm": ("itm_logits", "itm_labels"),
    "caption": ("caption_logits", "caption_targets"),
    "vqa": ("vqa_logits", "vqa_targets"),
}
DECODER_OBJECTIVES = ("caption", "vqa")  # trained by the decoder over the strategy's memory
WEIGHT_KEYS: dict[str, str] = {name: f"{name}_weight" for name in OBJECTIVE_OUTPUTS}


def available_objectives(cfg: ModelConfig) -> list[str]:
    """Objectives that ``cfg.fusion`` (and the decoder, if any) can provide."""
    from mmray.models.fusion import FUSIONS

    provides = set(FUSIONS[cfg.fusion].provides)
    names = [n for n in ("contrastive", "itm") if set(OBJECTIVE_OUTPUTS[n]) <= provides]
    if "memory" in provides and cfg.decoder_depth > 0:
        names += DECODER_OBJECTIVES
    return names


def _cannot_provide(cfg: ModelConfig, name: str, weight: float) -> ConfigError:
    from mmray.models.fusion import FUSIONS

    key = f"model.{WEIGHT_KEYS[name]}"
    if name in DECODER_OBJECTIVES and cfg.decoder_depth == 0:
        return ConfigError(f"{key}={weight} asks for the {name} objective, which needs a decoder: set "
                           f"model.decoder_depth > 0, or {key} to 0 or -1 (auto).")
    able = [f for f, cls in FUSIONS.items() if set(OBJECTIVE_OUTPUTS.get(name, ())) <= set(cls.provides)]
    return ConfigError(f"{key}={weight} asks for the {name} objective, which model.fusion={cfg.fusion!r} cannot "
                       f"provide (it trains: {', '.join(available_objectives(cfg)) or 'nothing'}); strategies "
                       f"that provide it: {', '.join(able)}. Set {key} to 0 or -1 (auto), or change model.fusion.")


def objective_weights(cfg: ModelConfig) -> dict[str, float]:
    """``{objective: weight}`` of every objective to train (weight > 0), resolving *auto*; ConfigError if impossible."""
    available = available_objectives(cfg)
    weights = {}
    for name, key in WEIGHT_KEYS.items():
        weight = getattr(cfg, key)
        if weight == AUTO:
            weight = 1.0 if name in available else 0.0
        elif weight < 0:
            raise ConfigError(f"model.{key}: {weight} is not allowed; use -1 (auto) or a weight >= 0.")
        elif weight > 0 and name not in available:
            raise _cannot_provide(cfg, name, weight)
        if weight > 0:
            weights[name] = weight
    if not weights:
        raise ConfigError(f"no objective to train: model.fusion={cfg.fusion!r} with "
                          + ", ".join(f"model.{k}={getattr(cfg, k)}" for k in WEIGHT_KEYS.values())
                          + f" and model.decoder_depth={cfg.decoder_depth}. Give one of them a positive weight.")
    return weights
