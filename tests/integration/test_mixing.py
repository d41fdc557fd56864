"""Mixing two img2dataset sources with weights through the real Ray Data read: exact counts for an integer weight,
the expected share for a fractional one, and the same samples for the same seed."""
from __future__ import annotations

from collections import Counter

from mmray.data.mixing import copies
from mmray.data.pipeline import read_raw
from mmray.data.sources import inspect_shards
from tests.img2dataset_layout import write_img2dataset


def test_weighted_mix_of_two_sources_through_ray_data(ray_session, tmp_path):
    laion = write_img2dataset(str(tmp_path / "laion"), shards=3, urls_per_shard=40, failed_every=8)
    cc = write_img2dataset(str(tmp_path / "cc"), shards=2, urls_per_shard=50, output_format="parquet", seed=1)
    paths = inspect_shards(f"{tmp_path}/laion/{{00000..00002}}.tar::{tmp_path}/cc/")
    assert paths == list(laion) + list(cc)
    weights = {**dict.fromkeys(laion, 2.0), **dict.fromkeys(cc, 0.3)}
    ds = read_raw(paths, shuffle_seed=5, weights=weights, mix_seed=11)
    rows = [(shard, key) for batch in ds.iter_batches(batch_size=128, batch_format="numpy")
            for shard, key in zip(batch["shard"], batch["key"])]
    per_source = Counter("laion" if "/laion/" in shard else "cc" for shard, _ in rows)
    assert per_source["laion"] == 2 * 3 * 35                         # integer weight: every sample exactly twice
    expected_cc = sum(copies(0.3, 11, shard, key) for shard, keys in cc.items() for key in keys)
    assert per_source["cc"] == expected_cc and 15 <= expected_cc <= 45  # ~0.3 x 100, decided per sample by seed
    assert len(set(rows)) == len(rows)                                  # copies have their own keys
    assert {k for _, k in rows if "~" not in k} >= {k for keys in laion.values() for k in keys}
