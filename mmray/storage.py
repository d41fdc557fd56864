"""URI-aware storage helpers: one small API for local paths and ``s3://bucket/prefix``.

Everything that reads or writes data sets, tokenizers or reports goes through here, so that an S3 path works
wherever a local path does. S3 is reached through pyarrow's ``S3FileSystem`` (the same client Ray Data uses);
the endpoint follows boto3's conventions (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``) unless the caller
passes one from the config, and credentials come only from the standard AWS chain: this module never accepts,
stores or logs a key. Every function takes an optional keyword ``endpoint_url`` (from the config); without it the
environment decides.
"""
from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
_S3_MAX_ATTEMPTS = 10
_DEFAULT_REGION = "us-east-1"


class StorageError(ValueError):
    """A path that cannot be used: missing file, directory or bucket. The message names the path.

    A ValueError so that callers (the CLI) can treat it as bad input rather than an internal failure.
    """


class EndpointUnreachable(Exception):
    """A configured S3 endpoint where nothing accepts a connection; the message names it and where it came from.

    Deliberately not a StorageError (nor an OSError): callers that take a StorageError to mean "that file is
    missing" (optional files, shards a pattern may lack) must not mistake an endpoint they cannot reach for a
    missing file. The CLI reports it as bad input."""


def is_s3(path: str) -> bool:
    """True for ``s3://`` URIs."""
    return path.startswith(S3_SCHEME)


def endpoint_from_env() -> str | None:
    """The S3 endpoint boto3 would use: ``AWS_ENDPOINT_URL_S3`` wins over ``AWS_ENDPOINT_URL``, and neither counts
    with ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``; None means AWS."""
    return _endpoint(None)[0]


def _endpoint(endpoint_url: str | None) -> tuple[str | None, str]:
    """(the S3 endpoint to use, where it came from): the caller's ``endpoint_url``, else the environment's (see
    :func:`endpoint_from_env`; none when ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``, as boto3 has it); (None,
    "") means AWS."""
    if endpoint_url:
        return endpoint_url, "endpoint_url"
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":  # as boto3 reads it
        return None, ""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if value := os.environ.get(name):
            return value, name
    return None, ""


def _parse_endpoint(endpoint_url: str):
    """An endpoint URL parsed, ``https`` when it names no scheme (as boto3 reads ``host:port``)."""
    return urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")


def _region_from_env() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or _DEFAULT_REGION


_PROBE_ATTEMPTS, _PROBE_TIMEOUT_S, _PROBE_PAUSE_S = 3, 3.0, 0.5


_REACHABLE: set[str] = set()  # endpoints that accepted a connection in this process
# Behind a proxy the endpoint may be reachable only through it: a direct connection says nothing, so none is tried.
_PROXY_VARS = {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"}


def _without_userinfo(url: str) -> str:
    """A URL with everything before its last ``@`` (a ``user:password@``, whatever characters the password holds)
    replaced by ``***@``, for messages."""
    head, sep, tail = url.partition("://")
    rest = tail if sep else head
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return (head + sep if sep else "") + rest


def _check_reachable(endpoint_url: str, source: str) -> None:
    """EndpointUnreachable naming a configured S3 endpoint where nothing accepts a connection (a typo in the URL, a
    server that is down), after a few quick tries: pyarrow's client would retry it for ~90 s, as it retries any
    transient error (``_S3_MAX_ATTEMPTS``), and then fail with a traceback. Only the TCP connection is tried, so this
    needs no credentials and sends no request; a reachable endpoint's errors (403, a missing bucket, 503s) are S3's to
    report, and are reported or retried as before. Not tried behind a proxy (``_PROXY_VARS``)."""
    if endpoint_url in _REACHABLE or _PROXY_VARS & os.environ.keys():
        return
    parsed = _parse_endpoint(endpoint_url)
    shown = _without_userinfo(endpoint_url)  # never log credentials, even ones written into the URL
    try:
        address = (parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80))
    except ValueError:  # a port that is not a number (its text may hold part of a password: not repeated)
        raise EndpointUnreachable(f"S3 endpoint {shown!r} is not a valid URL (its port is not a number)") from None
    for attempt in range(_PROBE_ATTEMPTS):
        try:
            socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
            _REACHABLE.add(endpoint_url)
            return
        except OSError as e:
            error = e
            if attempt + 1 < _PROBE_ATTEMPTS:
                time.sleep(_PROBE_PAUSE_S * 2 ** attempt)
    raise EndpointUnreachable(f"cannot connect to the S3 endpoint {shown} (from {source}) after "
                              f"{_PROBE_ATTEMPTS} tries: {error.strerror or error}; check the URL and that the "
                              "server is up")


@functools.lru_cache(maxsize=None)
def _s3_filesystem(endpoint_url: str | None, region: str) -> pafs.S3FileSystem:
    """Build one S3FileSystem per (endpoint, region); building one per call would redo the SDK setup each time.

    No credentials are passed: pyarrow's AWS SDK then walks the standard chain (environment, profile, instance role).
    """
    kwargs: dict = {
        "region": region,
        # Lets a small write be one PutObject at close instead of a three-request multipart upload.
        "allow_delayed_open": True,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_MAX_ATTEMPTS),
    }
    if endpoint_url:
        parsed = _parse_endpoint(endpoint_url)
        kwargs["scheme"] = parsed.scheme
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
    return pafs.S3FileSystem(**kwargs)


_LOCAL_FS = pafs.LocalFileSystem()


def resolve(path: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a path or URI to (pyarrow filesystem, path inside it).

    ``s3://bucket/key`` gives an S3FileSystem and ``bucket/key``; anything else is a local path, made absolute
    (with ``~`` expanded) so that Ray workers running elsewhere in the tree see the same file.
    """
    if is_s3(path):
        rest = path[len(S3_SCHEME):]
        key = rest.rstrip("/")
        if not key or rest.startswith("/"):
            raise StorageError(f"S3 URI has no bucket: {path!r} (write s3://BUCKET/KEY)")
        if "//" in key:  # Arrow's S3 filesystem refuses such keys (with a traceback); almost always a typo
            raise StorageError(f"S3 URI has an empty path component ('//'): {path!r}; remove the extra '/'")
        endpoint, source = _endpoint(endpoint_url)
        if endpoint:  # checked once a process (see _check_reachable)
            _check_reachable(endpoint, source)
        return _s3_filesystem(endpoint, _region_from_env()), key
    return _LOCAL_FS, os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts; ``s3://`` URIs always use ``/``, local paths use the OS convention."""
    if is_s3(base):
        return S3_SCHEME + posixpath.join(base[len(S3_SCHEME):].rstrip("/"), *(p.strip("/") for p in parts))
    return os.path.join(base, *parts)


def _bucket_missing(fs: pafs.FileSystem, inner: str, err: OSError) -> bool:
    """Whether an S3 "not found" failure is really a missing bucket, so the error can say so plainly.

    Only asked for not-found errors: a network failure has already used up its retries, and asking S3 again
    would double the wait before the user sees it.
    """
    if not isinstance(fs, pafs.S3FileSystem):
        return False
    if "NO_SUCH_BUCKET" in str(err):
        return True
    try:
        return fs.get_file_info(inner.split("/", 1)[0]).type == pafs.FileType.NotFound
    except OSError:
        return False


@contextlib.contextmanager
def _named_errors(path: str, fs: pafs.FileSystem, inner: str, what: str) -> Iterator[None]:
    """Turn "not found" failures into a StorageError that names the path; leave other I/O errors as they are."""
    try:
        yield
    except OSError as err:
        if not isinstance(err, FileNotFoundError) and "NO_SUCH_BUCKET" not in str(err):
            raise
        if _bucket_missing(fs, inner, err):
            bucket = inner.split("/", 1)[0]
            raise StorageError(f"S3 bucket {bucket!r} does not exist (while accessing {what} {path})") from err
        raise StorageError(f"{what} does not exist: {path}") from err


# The S3 errors (as Arrow's S3 filesystem names them) that mean the request was refused for its credentials
_REFUSED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied",
            "InvalidAccessKeyId", "SignatureDoesNotMatch")


def access_refused(err: BaseException) -> str | None:
    """For an error (or one it was raised from) that is S3 refusing a request for its credentials, what to tell the
    user; None for anything else."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and any(code in str(err) for code in _REFUSED):
            return (f"S3 refused the request: {err}. Check the credentials mmray runs with (AWS_PROFILE, "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the node's IAM role) and the bucket's policy")
        err = err.__cause__ or err.__context__ or getattr(err, "cause", None)
    return None


def exists(path: str, *, endpoint_url: str | None = None) -> bool:
    """True if a file or directory (or, on S3, a non-empty prefix) exists at ``path``."""
    fs, inner = resolve(path, endpoint_url)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_bytes(path: str, *, endpoint_url: str | None = None) -> bytes:
    """Read a whole file. Raises StorageError naming the path if it (or its bucket) is missing."""
    fs, inner = resolve(path, endpoint_url)
    with _named_errors(path, fs, inner, "file"):
        with fs.open_input_stream(inner, compression=None) as f:  # the bytes as stored: no decompressing by suffix
            return f.read()


def read_text(path: str, *, endpoint_url: str | None = None) -> str:
    """Read a whole UTF-8 text file."""
    return read_bytes(path, endpoint_url=endpoint_url).decode("utf-8")


def write_bytes(path: str, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Write a whole file so that readers never see a partial one.

    Local: write a temporary file in the same directory, then ``os.replace`` it (atomic on POSIX), creating parent
    directories as needed. S3: one object upload, which S3 makes visible only when complete.
    """
    if is_s3(path):
        _write_s3(path, data, endpoint_url)
    else:
        _write_local(resolve(path)[1], data)


def _write_local(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_s3(path: str, data: bytes, endpoint_url: str | None) -> None:
    fs, inner = resolve(path, endpoint_url)
    if "/" not in inner:
        raise StorageError(f"S3 URI names a bucket but no object key: {path}")
    with _named_errors(path, fs, inner, "file"):
        with fs.open_output_stream(inner, compression=None) as f:  # as given: no compressing by suffix
            f.write(data)


def write_text(path: str, text: str, *, endpoint_url: str | None = None) -> None:
    """Write a whole UTF-8 text file (atomically, see ``write_bytes``)."""
    write_bytes(path, text.encode("utf-8"), endpoint_url=endpoint_url)


def delete(path: str, *, endpoint_url: str | None = None) -> None:
    """Delete one file if it exists; a missing file is not an error (deleting is idempotent)."""
    fs, inner = resolve(path, endpoint_url)
    with _named_errors(path, fs, inner, "file"):
        try:
            fs.delete_file(inner)
        except FileNotFoundError:
            pass


def _walk_local(root: str, suffix: str | None) -> list[str]:
    """Every file below a local directory, sorted by path. Symlinked directories are followed, but each directory
    is listed once: under its real name when it is below ``root`` (and not hidden), else under its first name in
    path order, hidden names last; so a link back up the tree (a loop) or a second name for a directory (an alias,
    ``favourites -> cats``) lists no file twice (no image lands in both splits), and an alias with a hidden name
    (``.cats_alias``) hides nothing. Symlinks to files are listed, dangling ones too (reading them then fails, and is
    counted, not skipped). A directory that cannot be listed is a StorageError, not a silent gap."""
    def unreadable(err: OSError) -> None:  # os.walk would skip a directory it cannot list, and its files with it
        raise StorageError(f"cannot list directory {err.filename}: {err.strerror}") from err

    def order(names: list[str]) -> None:
        names.sort(key=lambda name: (name.startswith("."), name))

    real = set()  # the directories below root under their own (visible) names
    for directory, dirnames, _ in os.walk(root, onerror=unreadable):
        if not any(part.startswith(".") for part in os.path.relpath(directory, root).split(os.sep) if part != "."):
            real.add(_ident(directory))
    seen: set[tuple[int, int]] = set()
    out = []
    for directory, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        here = _ident(directory)
        if here in seen:
            dirnames[:] = []
            continue
        seen.add(here)
        # a link to a directory listed under its own name is not followed
        dirnames[:] = [d for d in dirnames if not _link_into(os.path.join(directory, d), real)]
        order(dirnames)
        out += [os.path.join(directory, name) for name in filenames if suffix is None or name.endswith(suffix)]
    return sorted(out)


def _ident(path: str) -> tuple[int, int]:
    """What names a directory whatever path leads to it: (device, inode)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _link_into(path: str, directories: set[tuple[int, int]]) -> bool:
    """Whether ``path`` is a symlink to one of ``directories`` (a dangling one is not)."""
    try:
        return os.path.islink(path) and _ident(path) in directories
    except OSError:
        return False


def list_files(prefix: str, suffix: str | None = None, *, recursive: bool = False,
               endpoint_url: str | None = None) -> list[str]:
    """Files under the directory ``prefix``, as full paths/URIs, sorted.

    Only the files directly under it (sorted by name), or with ``recursive`` every file below it (sorted by path).
    ``suffix`` keeps only names ending with it (e.g. ``".tar"``). A missing directory, prefix or bucket raises
    StorageError naming it.
    """
    fs, inner = resolve(prefix, endpoint_url)
    if recursive and not is_s3(prefix):
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:  # the same error as an S3 prefix's, below
            raise StorageError(f"directory does not exist: {prefix}")
        return _walk_local(inner, suffix)
    with _named_errors(prefix, fs, inner, "directory"):
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive))
    files = [info for info in infos
             if info.type == pafs.FileType.File and (suffix is None or info.base_name.endswith(suffix))]
    if recursive:
        return sorted(S3_SCHEME + info.path if is_s3(prefix) else info.path for info in files)
    base = prefix if is_s3(prefix) else inner
    return [join(base, name) for name in sorted(info.base_name for info in files)]
