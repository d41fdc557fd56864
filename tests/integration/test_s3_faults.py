"""Reading shards from S3 through a proxy that answers 503 SlowDown and drops connections gives exactly the samples
(keys and bytes) that a direct read gives: pyarrow's S3 retries (and Ray Data's) absorb the faults, and a broken
stream is never mistaken for a truncated shard."""
from __future__ import annotations

import http.client
import posixpath
from urllib.parse import urlparse

import pytest

from mmray.data.inspect import find_shards
from mmray.data.pipeline import read_raw
from tests.img2dataset_layout import write_img2dataset
from tests.s3_faults import FaultyS3Proxy


def _samples(paths: list[str]) -> list[tuple]:
    ds = read_raw(paths)
    rows = [(posixpath.basename(shard), key, image, caption, error)
            for batch in ds.iter_batches(batch_size=64, batch_format="numpy")
            for shard, key, image, caption, error in zip(batch["shard"], batch["key"], batch["image"],
                                                         batch["caption"], batch["error"])]
    return sorted(rows)


def test_reads_through_injected_s3_faults_return_exactly_the_samples(ray_session, s3_endpoint, s3_bucket,
                                                                      monkeypatch):
    laion = f"s3://{s3_bucket}/laion"
    expected = write_img2dataset(laion, shards=2, urls_per_shard=10, failed_every=4)
    expected.update(write_img2dataset(f"s3://{s3_bucket}/cc", shards=1, urls_per_shard=8, output_format="parquet",
                                      failed_every=3))
    spec = f"{laion}/::s3://{s3_bucket}/cc/{{00000..00000}}.parquet"
    paths = find_shards(spec)
    assert paths == list(expected)  # the tars' metadata Parquet files are not shards
    direct = _samples(paths)
    assert [(s, k) for s, k, *_ in direct] == sorted((posixpath.basename(p), k) for p, keys in expected.items()
                                                     for k in keys)
    assert all(image and caption and not error for _, _, image, caption, error in direct)

    with FaultyS3Proxy(s3_endpoint, fail_every=7, drop_every=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)  # the driver's S3 filesystem (sent to the readers)
        assert find_shards(spec) == paths
        faulty = _samples(paths)
    assert proxy.counters["slowdowns"] >= 2 and proxy.counters["drops"] >= 4, proxy.counters
    assert faulty == direct


def test_a_slowdown_answer_to_head_has_no_body_and_keeps_the_connection_usable(s3_endpoint, s3_bucket):
    """A 503 answer to HEAD carries no body (RFC 9110 9.3.2): bytes sent after it would be read as the start of the
    next answer on the same keep-alive connection ("Invalid status line"), a fault no real S3 endpoint makes."""
    with FaultyS3Proxy(s3_endpoint, fail_every=1) as proxy:
        url = urlparse(proxy.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        try:
            conn.request("HEAD", f"/{s3_bucket}")
            first = conn.getresponse()
            assert (first.status, first.read()) == (503, b"")
            proxy.fail_every = 0
            conn.request("HEAD", f"/{s3_bucket}")  # the same connection
            again = conn.getresponse()
            assert (again.status, again.read()) == (200, b"")
            conn.request("GET", f"/{s3_bucket}?list-type=2")
            listing = conn.getresponse()
            assert listing.status == 200 and b"ListBucketResult" in listing.read()
        finally:
            conn.close()
    assert proxy.counters == {"requests": 3, "slowdowns": 1, "drops": 0}
