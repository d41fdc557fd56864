"""Storage helpers on local disk, and the S3 parts that need no server (see integration/test_prepare_s3.py)."""
from __future__ import annotations

import json
import os
import socket

import pyarrow.fs as pafs
import pytest

from mmray import storage
from mmray.storage import EndpointUnreachable, StorageError


def test_join_and_is_s3():
    assert storage.join("s3://bucket/prefix/", "train", "00000.tar") == "s3://bucket/prefix/train/00000.tar"
    assert storage.join("s3://bucket", "a") == "s3://bucket/a"
    assert storage.join("/data", "train", "x.tar") == "/data/train/x.tar"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3/b") and not storage.is_s3("data/s3://x")


def test_resolve_local_is_absolute_with_home_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    fs, path = storage.resolve("~/data/x.tar")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "data" / "x.tar")
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("rel/y")[1] == str(tmp_path / "rel" / "y")


@pytest.fixture
def listening():
    """Two endpoints where something accepts connections (and says nothing: no request is sent)."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    yield [f"http://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    for s in socks:
        s.close()


def test_resolve_s3_reuses_one_filesystem_per_endpoint(monkeypatch, listening):
    monkeypatch.setenv("AWS_ENDPOINT_URL", listening[0])
    fs_a, key = storage.resolve("s3://bucket-a/some/key")
    fs_b, _ = storage.resolve("s3://bucket-b/other")
    assert isinstance(fs_a, pafs.S3FileSystem) and key == "bucket-a/some/key"
    assert fs_a is fs_b
    assert storage.resolve("s3://bucket-a/k", endpoint_url=listening[1])[0] is not fs_a
    with pytest.raises(StorageError, match="no bucket"):
        storage.resolve("s3://")
    with pytest.raises(StorageError, match="no object key"):
        storage.write_bytes("s3://only-a-bucket", b"x")
    with pytest.raises(StorageError, match=r"S3 URI has no bucket: 's3:///x'"):  # not bucket "x"
        storage.resolve("s3:///x")
    with pytest.raises(StorageError, match=r"empty path component \('//'\): 's3://bucket-a//x'"):
        storage.resolve("s3://bucket-a//x")  # Arrow's S3 filesystem raises ArrowInvalid with a traceback


def test_an_s3_endpoint_where_nothing_listens_is_named_at_once(monkeypatch, listening, capsys):
    """pyarrow would retry it for ~90 s and then raise an OSError traceback; the user sees the endpoint, where it
    came from, and why, after three quick tries."""
    monkeypatch.setattr(storage, "_PROBE_PAUSE_S", 0.0)
    for name in storage._PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed below: nothing listens there any more
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(EndpointUnreachable, match=f"^cannot connect to the S3 endpoint {dead} .from AWS_ENDPOINT_URL. "
                                           "after 3 tries: Connection refused; check the URL and that the server "
                                           "is up$"):
        storage.read_bytes("s3://bucket/data/x.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    with pytest.raises(EndpointUnreachable, match="from AWS_ENDPOINT_URL_S3"):
        storage.list_files("s3://bucket/data/")
    with pytest.raises(EndpointUnreachable, match=f"endpoint {dead} .from endpoint_url."):
        storage.exists("s3://bucket/x", endpoint_url=dead)
    with pytest.raises(EndpointUnreachable, match="S3 endpoint 'http://127.0.0.1:nine' is not a valid URL"):
        storage.exists("s3://bucket/x", endpoint_url="http://127.0.0.1:nine")
    # credentials written into the URL are never shown
    with pytest.raises(EndpointUnreachable) as e:
        storage.exists("s3://bucket/x", endpoint_url=dead.replace("://", "://KEYID:SECRET@"))
    assert "SECRET" not in str(e.value) and "KEYID" not in str(e.value) and "http://***@127.0.0.1:" in str(e.value)
    for password in ("s3cr/et", "s3#cr", "p:9x"):
        with pytest.raises(EndpointUnreachable) as e:
            storage.exists("s3://bucket/x", endpoint_url=f"http://admin:{password}@127.0.0.1:nine")
        assert "admin" not in str(e.value) and password not in str(e.value)
    # Not taken for a missing file by the callers that skip missing ones: a shard pattern, a sweep file.
    from mmray.data.sources import Part
    from mmray.sweep import spec as sweep_spec

    with pytest.raises(EndpointUnreachable):
        Part("s3://bucket/laion/{00000..00001}.tar", prepared=False).shards(allow_missing=True)
    with pytest.raises(EndpointUnreachable):
        sweep_spec.load("s3://bucket/sweep.yaml")
    # What the user sees: `mmray data inspect` (and train, which resolves its data the same way) exits as for bad
    # input, with the message as its JSON summary's error.
    from mmray import cli

    assert cli.main(["data", "inspect", "s3://bucket/laion/"]) == cli.EXIT_BAD_INPUT
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == {"error": f"cannot connect to the S3 endpoint {dead} (from AWS_ENDPOINT_URL_S3) after 3 tries: "
                             "Connection refused; check the URL and that the server is up", "kind": "bad_input"}
    # Behind a proxy the endpoint may be reachable only through it: no direct connection is tried.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert isinstance(storage.resolve("s3://bucket/x", endpoint_url=dead)[0], pafs.S3FileSystem)
    monkeypatch.delenv("HTTPS_PROXY")
    # Something listening is enough: what S3 answers there is S3's to report, as before.
    assert isinstance(storage.resolve("s3://bucket/x", endpoint_url=listening[0])[0], pafs.S3FileSystem)


def test_write_read_round_trip_creates_parents_atomically(tmp_path):
    path = str(tmp_path / "a" / "b" / "file.bin")
    storage.write_bytes(path, b"first")
    storage.write_bytes(path, b"second")
    assert storage.read_bytes(path) == b"second"
    storage.write_text(str(tmp_path / "t.txt"), "héllo")
    assert storage.read_text(str(tmp_path / "t.txt")) == "héllo"
    assert os.listdir(tmp_path / "a" / "b") == ["file.bin"]  # no temporary file left behind


def test_exists_list_and_delete(tmp_path):
    for name in ("b.tar", "a.tar", "a_stats.json"):
        storage.write_bytes(str(tmp_path / name), b"x")
    storage.write_bytes(str(tmp_path / "sub" / "c.tar"), b"x")
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / n) for n in ("a.tar", "a_stats.json", "b.tar")]
    assert storage.list_files(str(tmp_path), suffix=".tar") == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert storage.list_files(str(tmp_path), suffix=".tar", recursive=True) == [
        str(tmp_path / n) for n in ("a.tar", "b.tar", "sub/c.tar")]
    assert storage.exists(str(tmp_path / "sub")) and storage.exists(str(tmp_path / "a.tar"))
    storage.delete(str(tmp_path / "a.tar"))
    storage.delete(str(tmp_path / "a.tar"))  # idempotent
    assert not storage.exists(str(tmp_path / "a.tar"))


def test_missing_paths_raise_storage_error_naming_them(tmp_path):
    missing = str(tmp_path / "nothing" / "here.json")
    with pytest.raises(StorageError, match="here.json"):
        storage.read_bytes(missing)
    for recursive in (False, True):
        with pytest.raises(StorageError, match="directory does not exist: .*nothing"):
            storage.list_files(str(tmp_path / "nothing"), recursive=recursive)
    storage.write_bytes(str(tmp_path / "file.tar"), b"x")
    with pytest.raises(StorageError, match="cannot list directory .*file.tar"):  # a file named as a folder
        storage.list_files(str(tmp_path / "file.tar"), recursive=True)
    assert issubclass(StorageError, ValueError)


def test_s3_refusing_the_credentials_is_bad_input_naming_what_to_check(capsys):
    """A wrong secret or a bucket policy (Arrow's S3 filesystem raises an OSError with the AWS error code) is the
    user's to fix: exit 2 with the refused request and what to check, not a traceback (exit 1)."""
    import argparse

    from mmray import cli

    denied = OSError("When getting information for key 'p/train' in bucket 'sec': AWS Error ACCESS_DENIED during "
                     "HeadObject operation: No response body.")

    def command(args):
        try:
            raise denied
        except OSError as e:
            raise RuntimeError("in a Ray task") from e

    assert storage.access_refused(RuntimeError("x")) is None and storage.access_refused(OSError("NO_SUCH_KEY")) is None
    assert cli.run(command, argparse.Namespace()) == cli.EXIT_BAD_INPUT
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "bad_input"
    assert summary["error"].startswith("S3 refused the request: When getting information for key 'p/train' in bucket "
                                       "'sec': AWS Error ACCESS_DENIED")
    assert "AWS_PROFILE" in summary["error"]


def test_configured_endpoints_are_ignored_when_boto3_would(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert storage.endpoint_from_env() == "http://127.0.0.1:9000"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.endpoint_from_env() is None
    assert storage._endpoint("http://127.0.0.1:9001")[0] == "http://127.0.0.1:9001"  # given explicitly: used
