"""mmray: multimodal (image + text) training on Ray Train + DeepSpeed, under a dollar budget."""

__version__ = "0.1.0"
