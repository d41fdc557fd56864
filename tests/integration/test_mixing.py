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

    # Training's datasource (positioned, for exact resume) mixes in the read task, with the weights it fetched from
    # the object store: the same samples.
    from mmray.data.pipeline import DataPosition

    position = ray_session.remote(DataPosition).remote()
    positioned = read_raw(paths, shuffle_seed=5, weights=weights, mix_seed=11, position=position)
    assert sorted(zip(*(positioned.to_pandas()[c] for c in ("shard", "key")))) == sorted(rows)


def test_a_read_task_does_not_carry_every_shards_weight(ray_session, tmp_path):
    """Ray Data stores each read task on its own, with the datasource in it: the mixing weights (one per shard) go to
    the object store once instead, so a task's size does not grow with the number of shards (at 41,000 shards a
    weight table in every task would be tens of GB)."""
    from ray import cloudpickle

    from mmray.data.mixing import Resample
    from mmray.data.pipeline import DataPosition
    from mmray.data.position import PositionedShardDatasource

    paths = [str(tmp_path / f"{i:05d}.tar") for i in range(2000)]
    for path in paths:
        with open(path, "wb") as f:
            f.write(bytes(1024))  # an empty tar
    position = ray_session.remote(DataPosition).remote()

    def task_bytes(n: int) -> int:
        source = PositionedShardDatasource(paths[:n], seed=0, position=position,
                                           resample=Resample({p: 1.5 for p in paths[:n]}, 0))
        return max(len(cloudpickle.dumps(task)) for task in source.get_read_tasks(n))

    small, large = task_bytes(10), task_bytes(2000)
    assert large < small + 2000, (small, large)  # 2000 weights would be >100 KB
