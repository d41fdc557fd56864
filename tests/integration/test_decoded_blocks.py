"""The training pipeline decodes at most decoded_rows samples a call (128 MiB of pixels), however many samples Ray
Data's read operator hands it at once: it merges the reader's blocks up to its target_max_block_size (128 MiB) of
encoded images, whole shards here. The consumer gets every sample once, in blocks of about that size."""
from collections import Counter

from mmray import config
from mmray.data import pipeline
from mmray.data.sources import list_shards
from mmray.data.tokenizer import TextTokenizer

ROWS = 100


def test_a_shard_larger_than_a_decoded_batch_is_decoded_and_delivered_in_chunks(ray_session, tiny_dataset,
                                                                              monkeypatch):
    # Scaled down: 100 samples of 32 px fill a decoded batch (43,690 do at the real 128 MiB), and Ray Data's block
    # target is one such batch's pixels, as the real 128 MiB target is at the real size.
    monkeypatch.setattr(pipeline, "DECODED_BATCH_BYTES", ROWS * 32 * 32 * 3)
    assert pipeline.decoded_rows(32) == ROWS
    paths = list_shards(f"{tiny_dataset}/train")
    expected = Counter(r["key"] for r in pipeline.read_raw(paths).select_columns(["key"]).take_all())
    cfg = config.load(None, [f"data.source={tiny_dataset}", "data.image_size=32", "data.max_text_len=24"])
    tokenizer = TextTokenizer.from_file(f"{tiny_dataset}/tokenizer.json")

    class Recorded(pipeline.Preprocess):  # defined here, so Ray ships it by value to the workers
        def __call__(self, batch):
            out = super().__call__(batch)
            out["call_rows"] = [len(batch["key"])] * len(out["key"])
            return out

    ds = pipeline.preprocessed(pipeline.read_raw(paths, shuffle_seed=0),
                               Recorded(tokenizer.to_str(), 32, cfg.data.max_text_len))
    ds.context.target_max_block_size = pipeline.DECODED_BATCH_BYTES
    sizes, calls, keys = [], Counter(), Counter()
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
        sizes.append(len(block["key"]))
        calls.update(block["call_rows"].tolist())
        keys.update(block["key"].tolist())
        assert block["image"].shape[1:] == (32, 32, 3)
    assert keys == expected and set(keys.values()) == {1} and len(keys) == 512
    # Preprocess never decoded more than a decoded batch at once; Ray Data merges the remainders of a shard into
    # blocks, and slices a block only past 1.5 times its target.
    assert max(calls) == ROWS and max(sizes) < 1.5 * ROWS and len(sizes) > len(paths), (sizes, calls)

    # read_split, as training reads: the same samples, once each.
    split = pipeline.read_split(paths, cfg, tokenizer, shuffle_seed=0).select_columns(["key"]).take_all()
    assert Counter(r["key"] for r in split) == expected
