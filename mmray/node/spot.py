"""Spot interruption notices become Ray node drains, so that no preemption goes unannounced.

Ray's autoscaler does not pass a cloud's interruption notice on, so without this a spot node simply vanishes and
Ray Train sees a node failure (restart from the last periodic checkpoint). This watcher runs on every spot worker
node, beside the raylet, and polls the instance metadata service:

- AWS (IMDSv2): ``PUT /latest/api/token`` for a session token (reused until shortly before its TTL runs out, and
  fetched again on a 401), then ``GET /latest/meta-data/spot/instance-action``: 404 means no notice, 200 carries
  ``{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}``, the moment the instance goes (two minutes after
  the notice). Optionally also ``GET /latest/meta-data/events/recommendations/rebalance`` (``{"noticeTime": ...}``),
  an early warning of elevated risk that has no deadline: the configured ``rebalance_deadline`` stands in for it.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``: ``TRUE`` once the VM is
  being preempted; the guest then has about 30 s, so the deadline is 30 s after the first ``TRUE`` seen.

On a notice it drains ITS OWN Ray node with ``DRAIN_NODE_REASON_PREEMPTION`` and the absolute deadline
(``deadline_timestamp_ms``), through the same GCS client call that ``ray drain-node`` makes. Ray then stops placing
work on the node, Ray Train V2 hands the deadline to every worker through ``ray.train.get_preemption_info()`` (the
trigger for mmray's emergency checkpoint), restarts the run elsewhere once the deadline has passed, and the raylet
exits by itself once the node is drained and idle.

Behaviour worth knowing:

- Once per notice: a notice is identified by its content (action and time), and the same notice seen on every
  later poll is not acted on again. A NEW notice drains again only if its deadline is earlier than the one already
  given to Ray (a rebalance recommendation followed by the real two-minute notice tightens the deadline; Ray accepts
  a second drain of a draining node and keeps the new deadline). A failed drain is retried on the next poll.
- The watcher keeps running after a drain (a later, shorter notice can still tighten the deadline) until it is
  stopped (SIGTERM/SIGINT) or the machine goes away. ``once=True`` polls until one poll succeeds, acts, and returns.
- Transient metadata errors (connection refused or reset, timeouts, 5xx, unexpected statuses) never end it: the
  next poll waits twice as long each time, from the interval up to four times the interval, then recovers.
- A deadline already in the past (a late look, clock skew) is given to Ray as 1 s from now: Ray reads a deadline of
  0 as "none". A notice whose time is more than 10 minutes past is stale (a stopped instance that came back) and is
  logged and ignored.
- Idle cost: one small HTTP request to a link-local address per interval (5 s on AWS, 1 s on GCP, where the notice
  is only 30 s), no threads besides a one-off start-up check. Ray's Python extension is imported once at start
  (about 50 MB of memory) so that a wrong GCS address, token or node shows in the log at start, not at the notice.
- It logs one line per event on stderr and never logs a metadata token.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

log = logging.getLogger("mmray.node.spot")

ENDPOINT_ENV = "MMRAY_IMDS_ENDPOINT"
NODE_ID_ENV = "MMRAY_NODE_ID"
DEFAULT_ENDPOINTS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
DEFAULT_INTERVALS = {"aws": 5.0, "gcp": 1.0}  # seconds between polls; GCP's notice is only 30 s
AWS_NOTICE_S = 120.0  # AWS's documented warning time, used when an instance-action cannot be parsed
GCP_NOTICE_S = 30.0  # GCP: about 30 s between the preemption notice and the hard stop
DEFAULT_REBALANCE_DEADLINE_S = 120.0  # the same as Ray Train's own fallback when a drain has no deadline
TOKEN_TTL_S = 21600  # IMDSv2 maximum (6 h): one PUT per TTL, not one per poll
HTTP_TIMEOUT_S = 2.0
MIN_REMAINING_S = 1.0  # Ray reads a deadline of 0 as "no deadline"
STALE_NOTICE_S = 600.0
DRAIN_RPC_TIMEOUT_S = 10.0
REASON = "DRAIN_NODE_REASON_PREEMPTION"

AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"


class MetadataUnavailable(Exception):
    """The metadata service did not answer usefully this time (network error, timeout, 5xx, odd status)."""


class DrainFailed(RuntimeError):
    """Ray did not accept the drain (or could not be reached); the watcher tries again on the next poll."""


@dataclasses.dataclass(frozen=True)
class Notice:
    """One interruption notice, as the cloud gave it."""

    key: str  # identity: the same notice on every later poll is acted on once
    source: str  # aws-instance-action | aws-rebalance | gcp-preempted
    action: str  # terminate | stop | hibernate | rebalance | preempted
    deadline: float  # epoch seconds when the node is expected to go
    detail: str  # the notice as received (no secrets), for the log and the drain's reason message


class NoticeSource(Protocol):
    provider: str
    endpoint: str

    def poll(self, now: float) -> Notice | None:
        """The current notice, None if there is none; raises MetadataUnavailable on a transient failure."""


def parse_time(value: str) -> float:
    """Epoch seconds of an ISO-8601 UTC time such as ``2026-11-29T17:10:00Z`` (naive times are UTC)."""
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Http:
    """Tiny HTTP client for a metadata service: short timeouts, never through a proxy (the service is link-local)."""

    def __init__(self, timeout: float = HTTP_TIMEOUT_S):
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, url: str, headers: dict[str, str]) -> tuple[int, str]:
        """(status, body) for any HTTP answer; MetadataUnavailable when there is no answer."""
        req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "PUT" else None)
        try:
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    return resp.status, resp.read(1 << 16).decode("utf-8", "replace")
            except urllib.error.HTTPError as e:  # a status other than 2xx: still an answer
                with e:
                    return e.code, e.read(1 << 16).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # reading the body too
            reason = getattr(e, "reason", None) or e
            raise MetadataUnavailable(f"{method} {url}: {type(e).__name__}: {reason}") from None


class AwsImds:
    """AWS instance metadata service, IMDSv2 (session tokens)."""

    provider = "aws"

    def __init__(self, endpoint: str, http: Http | None = None, act_on_rebalance: bool = False,
                 rebalance_deadline: float = DEFAULT_REBALANCE_DEADLINE_S, token_ttl: int = TOKEN_TTL_S,
                 monotonic: Callable[[], float] = time.monotonic):
        self.endpoint = endpoint.rstrip("/")
        self.http = http or Http()
        self.act_on_rebalance, self.rebalance_deadline = act_on_rebalance, rebalance_deadline
        self.token_ttl, self._monotonic = token_ttl, monotonic
        self._token: str | None = None
        self._refresh_at = 0.0
        self.tokens_fetched = 0

    def _fetch_token(self) -> str:
        status, body = self.http.request("PUT", self.endpoint + AWS_TOKEN_PATH,
                                         {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl)})
        if status != 200 or not body:
            raise MetadataUnavailable(f"PUT {AWS_TOKEN_PATH}: HTTP {status}")
        self._token = body.strip()
        # Fetch a new one shortly before this one expires: at most a minute, or a tenth of the TTL, early.
        self._refresh_at = self._monotonic() + self.token_ttl - min(60.0, self.token_ttl / 10)
        self.tokens_fetched += 1
        return self._token

    def _get(self, path: str) -> str | None:
        """The body of a 200, None for a 404. A 401 (missing or expired token) gets a new token and one retry."""
        if self._token is None or self._monotonic() >= self._refresh_at:
            self._fetch_token()
        status, body = self._get_with_token(path)
        if status == 401:
            log.info("metadata token refused (expired or missing): fetching a new one")
            self._fetch_token()
            status, body = self._get_with_token(path)
        if status == 200:
            return body
        if status == 404:
            return None
        raise MetadataUnavailable(f"GET {path}: HTTP {status}")

    def _get_with_token(self, path: str) -> tuple[int, str]:
        return self.http.request("GET", self.endpoint + path, {"X-aws-ec2-metadata-token": self._token})

    def poll(self, now: float) -> Notice | None:
        body = self._get(AWS_ACTION_PATH)
        if body is not None:
            return self._instance_action(body, now)
        if self.act_on_rebalance:
            body = self._get(AWS_REBALANCE_PATH)
            if body is not None:
                return self._rebalance(body, now)
        return None

    @staticmethod
    def _instance_action(body: str, now: float) -> Notice:
        detail = " ".join(body.split())
        try:
            data = json.loads(body)
            action, deadline = str(data["action"]), parse_time(str(data["time"]))
        except (ValueError, KeyError, TypeError):
            # A 200 here IS a notice, even one we cannot read: assume AWS's documented two minutes.
            action, deadline = "unknown", now + AWS_NOTICE_S
            detail = f"unreadable, {AWS_NOTICE_S:.0f} s assumed: {detail[:200]}"
        return Notice(key=f"aws-instance-action:{detail}", source="aws-instance-action", action=action,
                      deadline=deadline, detail=detail)

    def _rebalance(self, body: str, now: float) -> Notice:
        detail = " ".join(body.split())
        return Notice(key=f"aws-rebalance:{detail}", source="aws-rebalance", action="rebalance",
                      deadline=now + self.rebalance_deadline, detail=detail)


class GcpMetadata:
    """GCP metadata server: ``instance/preempted`` is TRUE once the VM is being preempted (about 30 s left)."""

    provider = "gcp"

    def __init__(self, endpoint: str, http: Http | None = None, notice_s: float = GCP_NOTICE_S):
        self.endpoint = endpoint.rstrip("/")
        self.http = http or Http()
        self.notice_s = notice_s

    def poll(self, now: float) -> Notice | None:
        status, body = self.http.request("GET", self.endpoint + GCP_PREEMPTED_PATH, {"Metadata-Flavor": "Google"})
        if status != 200:
            raise MetadataUnavailable(f"GET {GCP_PREEMPTED_PATH}: HTTP {status}")
        value = body.strip().upper()
        if value == "FALSE":
            return None
        if value != "TRUE":
            raise MetadataUnavailable(f"GET {GCP_PREEMPTED_PATH}: unexpected value {body.strip()[:40]!r}")
        # The flag stays TRUE until the VM stops: one key, and the deadline counts from the first TRUE seen.
        return Notice(key="gcp-preempted", source="gcp-preempted", action="preempted",
                      deadline=now + self.notice_s, detail="instance/preempted=TRUE")


class RayDrainer:
    """Drains this machine's Ray node through the GCS, as ``ray drain-node`` does, without a driver.

    The address is ``address``, else ``RAY_ADDRESS``, else the one ``ray start`` recorded on this machine
    (``/tmp/ray/ray_current_cluster``). The node is ``node_id``, else ``MMRAY_NODE_ID``, else the one raylet that
    runs on this machine and is alive in that GCS.
    """

    def __init__(self, address: str | None = None, node_id: str | None = None):
        self.address = address
        self.explicit_node_id = node_id or os.environ.get(NODE_ID_ENV) or None
        self.node_id: str | None = None
        self._client = None
        self._lock = threading.Lock()

    def prepare(self) -> str:
        """Import Ray, connect to the GCS and find the node; returns the node id (hex). Idempotent."""
        with self._lock:
            if self._client is None:
                from ray._private import services
                from ray._raylet import GcsClient

                self.address = services.canonicalize_bootstrap_address_or_die(self.address)
                self._client = GcsClient(address=self.address)
            if self.node_id is None:
                self.node_id = self.explicit_node_id or self._local_node_id()
            return self.node_id

    def _local_node_id(self) -> str:
        from ray._private import services
        from ray.core.generated import gcs_pb2

        local = services.find_node_ids()  # the --node_id of every raylet process on this machine
        alive = self._client.get_all_node_info(timeout=DRAIN_RPC_TIMEOUT_S,
                                               state_filter=gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE)
        ours = sorted(nid.hex() for nid in alive if nid.hex() in local)
        if len(ours) != 1:
            raise DrainFailed(f"expected one live Ray node of the cluster at {self.address} on this machine, found "
                              f"{len(ours)} ({', '.join(ours) or 'none'}); pass --node-id")
        return ours[0]

    def __call__(self, remaining_s: float, message: str, deadline_at: float | None = None) -> dict:
        """Drain this node with the deadline ``deadline_at`` (epoch seconds; the notice's own, so that Ray gets it
        exactly), or ``remaining_s`` from now when none is given."""
        asked_at = time.time()
        try:
            from ray.core.generated import autoscaler_pb2

            node_id = self.prepare()
            deadline_ms = round((asked_at + remaining_s if deadline_at is None else deadline_at) * 1000)
            accepted, why = self._client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(REASON), message,
                                                    deadline_ms, timeout=DRAIN_RPC_TIMEOUT_S)
        except DrainFailed:
            raise
        except Exception as e:  # GCS unreachable, RPC timeout: find the node again next time
            self.node_id = None
            raise DrainFailed(f"{type(e).__name__}: {e}") from None
        if not accepted:
            raise DrainFailed(f"Ray rejected the drain of node {node_id}: {why}")
        return {"node_id": node_id, "deadline_ms": deadline_ms, "address": self.address}


Drain = Callable[[float, str, float], dict]  # (remaining_s, message, deadline_at) -> what it did


class SpotWatcher:
    """Polls a NoticeSource and drains the node once per notice. ``drain(remaining_s, message, deadline_at)`` does
    the drain.

    ``now`` is the wall clock (epoch seconds) the deadlines are computed against.
    """

    def __init__(self, source: NoticeSource, drain: Drain, interval: float = 5.0, max_backoff: float | None = None,
                 now: Callable[[], float] = time.time):
        self.source, self.drain, self.interval, self.now = source, drain, interval, now
        self.max_backoff = max_backoff if max_backoff is not None else 4 * interval
        self._stop = threading.Event()
        self._handled: set[str] = set()
        self._deadline: float | None = None  # the deadline Ray was given, epoch seconds
        self.polls = self.errors = 0
        self._unanswered = 0  # metadata failures in a row
        self.notices: list[dict] = []
        self.drains: list[dict] = []

    def stop(self) -> None:
        """End run() at its next wait (safe from a signal handler or another thread)."""
        self._stop.set()

    def poll_once(self) -> Notice | None:
        """Poll once and act on a notice; MetadataUnavailable and DrainFailed propagate."""
        self.polls += 1
        try:
            notice = self.source.poll(self.now())
        except MetadataUnavailable:
            self._unanswered += 1
            raise
        if self._unanswered:
            log.info("metadata service answering again after %d failed polls", self._unanswered)
            self._unanswered = 0
        if notice is not None:
            self.act(notice)
        return notice

    def act(self, notice: Notice) -> bool:
        """Drain for this notice unless it was handled already; True if a drain was requested now."""
        if notice.key in self._handled:
            return False
        now = self.now()
        remaining = notice.deadline - now
        record = {"source": notice.source, "action": notice.action, "deadline": _iso(notice.deadline),
                  "remaining_s": round(remaining, 1), "seen_at": _iso(now)}
        if remaining < -STALE_NOTICE_S:
            log.warning("ignoring a stale %s notice (%s): its time passed %.0f s ago", notice.source, notice.detail,
                        -remaining)
            self._handled.add(notice.key)
            self.notices.append({**record, "ignored": "stale"})
            return False
        if self._deadline is not None and notice.deadline >= self._deadline - 1:
            log.info("%s notice (%s): the node is already draining with an earlier or equal deadline (%s)",
                     notice.source, notice.detail, _iso(self._deadline))
            self._handled.add(notice.key)
            self.notices.append({**record, "ignored": "already draining"})
            return False
        log.warning("INTERRUPTION NOTICE %s action=%s deadline=%s (%.0f s left): draining this Ray node",
                    notice.source, notice.action, _iso(notice.deadline), remaining)
        message = f"mmray spot watcher: {notice.source} {notice.action} at {_iso(notice.deadline)} ({notice.detail})"
        # The deadline as the notice gives it (not now + remaining, which the time between two clock reads shifts),
        # or MIN_REMAINING_S from now when it has passed. DrainFailed: retried on the next poll.
        remaining = max(remaining, MIN_REMAINING_S)
        result = self.drain(remaining, message[:500], max(notice.deadline, now + MIN_REMAINING_S))
        self._handled.add(notice.key)
        self._deadline = notice.deadline
        self.notices.append(record)
        self.drains.append({**record, **(result or {})})
        log.warning("drained Ray node %s with reason %s, deadline %s (%.0f s left)",
                    (result or {}).get("node_id", "?"), REASON, _iso(notice.deadline), remaining)
        return True

    def run(self, once: bool = False, max_polls: int | None = None, once_attempts: int = 3) -> dict:
        """Poll until stopped (or max_polls). ``once``: stop after the first successful poll (acted upon), or raise
        the last error after ``once_attempts`` failures."""
        log.info("watching %s metadata at %s every %.3g s for interruption notices", self.source.provider,
                 self.source.endpoint, self.interval)
        failures_in_row = 0
        while not self._stop.is_set():
            try:
                self.poll_once()
            except (MetadataUnavailable, DrainFailed) as e:
                self.errors += 1
                failures_in_row += 1
                if failures_in_row & (failures_in_row - 1) == 0:  # 1st, 2nd, 4th, 8th... failure in a row
                    what = "drain failed" if isinstance(e, DrainFailed) else "metadata service unavailable"
                    log.warning("%s (%d in a row), retrying: %s", what, failures_in_row, e)
                if once and failures_in_row >= once_attempts:
                    raise
                delay = min(self.interval * 2 ** (failures_in_row - 1), max(self.max_backoff, self.interval))
            else:
                failures_in_row = 0
                if once:
                    break
                delay = self.interval
            if max_polls is not None and self.polls >= max_polls:
                break
            self._stop.wait(delay)
        return self.summary()

    def summary(self) -> dict:
        return {"provider": self.source.provider, "endpoint": self.source.endpoint, "polls": self.polls,
                "errors": self.errors, "notices": self.notices, "drains": self.drains}


def make_source(provider: str, endpoint: str | None = None, act_on_rebalance: bool = False,
                rebalance_deadline: float = DEFAULT_REBALANCE_DEADLINE_S) -> NoticeSource:
    """The notice source for ``provider``; the endpoint defaults to MMRAY_IMDS_ENDPOINT, then the cloud's own."""
    if provider not in DEFAULT_ENDPOINTS:
        raise ValueError(f"provider must be one of {', '.join(DEFAULT_ENDPOINTS)}, got {provider!r}")
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINTS[provider]
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"metadata endpoint must be an http:// URL, got {endpoint!r}")
    if provider == "aws":
        return AwsImds(endpoint, act_on_rebalance=act_on_rebalance, rebalance_deadline=rebalance_deadline)
    if act_on_rebalance:
        raise ValueError("--act-on-rebalance is an AWS notice; GCP has no rebalance recommendation")
    return GcpMetadata(endpoint)


# --------------------------------------------------------------------------------------------- process plumbing


def _is_watcher(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"mmray.node.spot" in cmdline or b"watch-spot" in cmdline


def claim_pidfile(path: str, wait_s: float = 5.0) -> None:
    """Write our pid to ``path``; first stop the watcher named there, if one still runs (a restart of Ray on the
    node reruns the start commands, which must not leave two watchers behind)."""
    pidfile = Path(path)
    try:
        old = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        old = None
    if old and old != os.getpid() and _is_watcher(old):
        os.kill(old, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while _is_watcher(old) and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("replaced the previous watcher (pid %d)", old)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{os.getpid()}\n")


def release_pidfile(path: str) -> None:
    pidfile = Path(path)
    try:
        if int(pidfile.read_text().split()[0]) == os.getpid():
            pidfile.unlink()
    except (OSError, ValueError, IndexError):
        pass


def start_preflight(drain: Drain) -> threading.Thread | None:
    """Connect to Ray and find the node in the background (a GCS that is down blocks for up to 40 s), so that a
    problem shows in the log at start and the first poll is not delayed."""
    prepare = getattr(drain, "prepare", None)
    if prepare is None:
        return None

    def check() -> None:
        try:
            node_id = prepare()
            log.info("guarding Ray node %s (GCS %s)", node_id, getattr(drain, "address", "?"))
        except Exception as e:  # retried at the notice
            log.error("cannot reach this node's Ray yet (will retry at the notice): %s: %s", type(e).__name__, e)

    thread = threading.Thread(target=check, name="mmray-spot-preflight", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    import sys

    from mmray.node.commands import main

    sys.exit(main())
