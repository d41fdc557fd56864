"""The tiny 2-worker training config shared by the integration tests (importable: pytest puts this folder on
sys.path). Each test adds what it is about as dotted overrides."""
from mmray import config

WORKERS, MICRO = 2, 16
GLOBAL = WORKERS * MICRO


def tiny_cfg(data, storage, *overrides) -> config.Config:
    """4 steps of a tiny model, checkpoints at steps 2 and 4, 64 held-out pairs."""
    return config.load(None, [
        f"data.source={data}", "data.image_size=32", "data.max_text_len=24", "data.shuffle_buffer=64",
        "model.image_depth=1", "model.text_depth=1", "model.image_width=64", "model.text_width=64",
        "model.embed_dim=32", f"train.num_workers={WORKERS}", f"train.micro_batch_size={MICRO}",
        "train.max_steps=4", "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=2",
        "train.lr=1e-3", "eval.max_samples=64", f"run.storage_path={storage}", *overrides])
