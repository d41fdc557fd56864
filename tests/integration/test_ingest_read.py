"""Data sets prepared from a folder of images (WebDataset and Parquet) read back through Ray Data, mmray's reader
and the decode path (mmray.data.inspect): every usable sample, no bad one."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmray.data.ingest import prepare_ingest
from mmray.data.inspect import inspect

GOOD = 12
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _image(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(i).rand(16, 16, 3) * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(GOOD):
        ext = list(FORMATS)[i % 4]
        path = root / ("a" if i % 2 else "b/c") / f"{i}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_image(i, FORMATS[ext]))
        path.with_suffix(".txt").write_text(f"picture number {i}")
        path.with_suffix(".json").write_text(json.dumps({"label": str(i % 3)}))
    (root / "a" / "lonely.png").write_bytes(_image(50, "PNG"))  # no caption
    (root / "a" / "broken.webp").write_bytes(_image(51, "WEBP")[:40])
    (root / "a" / "broken.txt").write_text("broken")
    return root


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_prepared_folder_reads_through_the_real_reader(ray_session, folder, tmp_path, fmt):
    summary = prepare_ingest(str(folder), str(tmp_path / fmt), format=fmt, samples_per_shard=4, val_samples=3)
    assert (summary["train_samples"], summary["val_samples"]) == (GOOD - 3, 3)
    assert summary["bad"] == {"corrupt_image": 1, "missing_caption": 1}
    report = inspect(str(tmp_path / fmt), image_size=16)
    assert report["samples"] == GOOD and report["bad"] == {} and report["shards"] == 4
