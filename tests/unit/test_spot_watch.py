"""The spot watcher against a fake metadata server on 127.0.0.1 that speaks IMDSv2 (and GCP's metadata flag).

The drain is injected (a recorder), so no Ray is needed; tests/integration/test_spot_drain.py drains a real node.
Deadlines are checked against a fake wall clock; intervals are milliseconds, so the whole file takes about a second.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmray.node import commands, spot

T0 = 1_800_000_000.0  # the fake "now" (epoch seconds, a whole second like the times AWS sends)
FAST = 0.001  # poll interval in tests


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeMetadata(ThreadingHTTPServer):
    """IMDSv2 on 127.0.0.1: PUT /latest/api/token (TTL header required) hands out tokens that expire; every GET under
    /latest/meta-data needs a valid, unexpired X-aws-ec2-metadata-token, else 401. Answers are set per path as
    (status, body); `failures` queues "500", "drop" (close without answering) or "hang" for the next requests.
    GCP's /computeMetadata/v1/instance/preempted answers `gcp_preempted` to requests with Metadata-Flavor: Google.
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.answers: dict[str, tuple[int, str]] = {}
        self.gcp_preempted = "FALSE"
        self.failures: list[str] = []
        self.hits: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def handle_error(self, request, client_address):  # a client that gave up on a "hang": nothing to report
        pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def notice(self, action: str = "terminate", at: float = T0 + 90) -> None:
        self.answers[spot.AWS_ACTION_PATH] = (200, json.dumps({"action": action, "time": iso(at)}))

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def count(self, method: str, path: str, status: int | None = None) -> int:
        return sum(1 for m, p, s in self.hits if m == method and p == path and status in (None, s))


class _Handler(BaseHTTPRequestHandler):
    server: FakeMetadata

    def log_message(self, *args):  # quiet
        pass

    def _answer(self, status: int, body: str = "") -> None:
        self.server.hits.append((self.command, self.path, status))  # before answering: the client may count next
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _failure(self) -> bool:
        with self.server.lock:
            failure = self.server.failures.pop(0) if self.server.failures else None
        if failure == "500":
            self._answer(500, "Internal Server Error")
        elif failure == "drop":
            self.close_connection = True  # no status line at all: the client sees the connection dropped
            self.server.hits.append((self.command, self.path, 0))
        elif failure == "hang":
            time.sleep(1.0)
            self._answer(200, "too late")
        return failure is not None

    def do_PUT(self):
        if self._failure():
            return
        if self.path != spot.AWS_TOKEN_PATH:
            return self._answer(404)
        try:
            ttl = int(self.headers["X-aws-ec2-metadata-token-ttl-seconds"])
        except (TypeError, ValueError):
            return self._answer(400, "missing or bad TTL")
        if not 1 <= ttl <= 21600:
            return self._answer(400, "bad TTL")
        token = uuid.uuid4().hex
        with self.server.lock:
            self.server.tokens[token] = time.monotonic() + ttl
        self._answer(200, token)

    def do_GET(self):
        if self._failure():
            return
        if self.path == spot.GCP_PREEMPTED_PATH:
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._answer(403, "Missing Metadata-Flavor:Google header.")
            return self._answer(200, self.server.gcp_preempted)
        with self.server.lock:
            expiry = self.server.tokens.get(self.headers.get("X-aws-ec2-metadata-token", ""))
        if expiry is None or time.monotonic() >= expiry:
            return self._answer(401)
        self._answer(*self.server.answers.get(self.path, (404, "Not Found")))


@pytest.fixture
def imds():
    server = FakeMetadata()
    yield server
    server.shutdown()
    server.server_close()


class Recorder:
    """The injected drain: records (remaining_s, message) and can fail the first `fail` calls."""

    def __init__(self, fail: int = 0):
        self.calls: list[tuple[float, str]] = []
        self.deadlines: list[float | None] = []  # the absolute deadline of each call, epoch seconds
        self.fail = fail

    def __call__(self, remaining_s: float, message: str, deadline_at: float | None = None) -> dict:
        if self.fail:
            self.fail -= 1
            raise spot.DrainFailed("GCS unreachable (test)")
        self.calls.append((remaining_s, message))
        self.deadlines.append(deadline_at)
        return {"node_id": "n" * 56}


def watcher(server: FakeMetadata, drain, clock: list[float] | None = None, timeout: float = 2.0,
            **source_kw) -> spot.SpotWatcher:
    clock = clock if clock is not None else [T0]
    source = spot.AwsImds(server.url, http=spot.Http(timeout=timeout), **source_kw)
    return spot.SpotWatcher(source, drain, interval=FAST, now=lambda: clock[0])


def test_no_notice_nothing_happens(imds):
    drain = Recorder()
    w = watcher(imds, drain)
    summary = w.run(max_polls=6)
    assert drain.calls == [] and summary["drains"] == [] and summary["notices"] == []
    assert summary["polls"] == 6 and summary["errors"] == 0
    assert imds.count("PUT", spot.AWS_TOKEN_PATH) == 1, "the token is reused across polls"
    assert imds.count("GET", spot.AWS_ACTION_PATH, 404) == 6
    assert imds.count("GET", spot.AWS_REBALANCE_PATH) == 0, "rebalance is only read when configured"


def test_notice_drains_once_with_the_remaining_deadline(imds):
    drain, clock = Recorder(), [T0]
    w = watcher(imds, drain, clock)
    w.run(max_polls=2)
    imds.notice("terminate", at=T0 + 120)
    clock[0] = T0 + 30  # seen at T0+30 for an interruption at T0+120: 90 s left
    w.run(max_polls=w.polls + 5)
    assert len(drain.calls) == 1, drain.calls
    remaining, message = drain.calls[0]
    assert abs(remaining - 90) < 1
    assert drain.deadlines == [T0 + 120]  # the notice's own deadline, exactly, for Ray
    assert "terminate" in message and iso(T0 + 120) in message
    assert [d["action"] for d in w.summary()["drains"]] == ["terminate"]


@pytest.mark.parametrize("action", ["stop", "hibernate"])
def test_every_action_is_a_notice(imds, action):
    drain = Recorder()
    imds.notice(action, at=T0 + 60)
    watcher(imds, drain).run(once=True)
    assert len(drain.calls) == 1 and abs(drain.calls[0][0] - 60) < 1 and action in drain.calls[0][1]


def test_expired_or_missing_token_is_fetched_again(imds):
    drain = Recorder()
    w = watcher(imds, drain)
    w.run(max_polls=2)
    imds.expire_tokens()  # the server forgets every token: the next GET gets a 401
    imds.notice(at=T0 + 100)
    w.run(max_polls=w.polls + 2)
    assert imds.count("GET", spot.AWS_ACTION_PATH, 401) == 1
    assert imds.count("PUT", spot.AWS_TOKEN_PATH) == 2
    assert w.errors == 0 and len(drain.calls) == 1 and abs(drain.calls[0][0] - 100) < 1


def test_token_is_renewed_shortly_before_its_ttl(imds):
    mono = [0.0]
    source = spot.AwsImds(imds.url, token_ttl=100, monotonic=lambda: mono[0])
    for t in (0.0, 50.0, 89.0):  # reused while more than a tenth of the TTL is left
        mono[0] = t
        source.poll(T0)
    assert imds.count("PUT", spot.AWS_TOKEN_PATH) == 1
    mono[0] = 91.0
    source.poll(T0)
    assert imds.count("PUT", spot.AWS_TOKEN_PATH) == 2
    assert imds.count("GET", spot.AWS_ACTION_PATH, 401) == 0, "renewed before the server refused it"


def test_transient_errors_are_retried_then_the_notice_is_acted_on(imds):
    drain = Recorder()
    w = watcher(imds, drain, timeout=0.3)  # "hang" answers after 1 s: a timeout
    imds.notice(at=T0 + 100)
    imds.failures = ["500", "drop", "hang", "500"]  # the first PUT fails, then GETs fail
    summary = w.run(max_polls=10)
    assert not imds.failures and summary["errors"] >= 4  # (more only if this machine is slower than 0.3 s)
    assert len(drain.calls) == 1 and abs(drain.calls[0][0] - 100) < 1


def test_connection_refused_does_not_crash():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        source = spot.AwsImds(dead)
        summary = spot.SpotWatcher(source, Recorder(), interval=FAST).run(max_polls=3)
    assert summary["errors"] == 3 and summary["drains"] == []


def test_backoff_doubles_up_to_four_intervals():
    class Down:
        provider, endpoint = "aws", "http://test"

        def poll(self, now):
            raise spot.MetadataUnavailable("down")

    w = spot.SpotWatcher(Down(), Recorder(), interval=1.0)
    waits = []
    w._stop.wait = lambda delay: waits.append(delay)
    w.run(max_polls=6)
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_failed_drain_is_retried_and_a_once_run_fails_after_three_tries(imds):
    imds.notice(at=T0 + 100)
    drain = Recorder(fail=1)
    w = watcher(imds, drain)
    w.run(max_polls=3)
    assert len(drain.calls) == 1 and w.errors == 1
    with pytest.raises(spot.DrainFailed):
        watcher(imds, Recorder(fail=5)).run(once=True)


def test_once_without_a_metadata_service_exits_1_naming_it_without_a_traceback(capsys):
    """`mmray node watch-spot --once` off the cloud (nothing listens at the endpoint): three tries, then exit 1 with
    what failed in the summary line, not a traceback."""
    from mmray import cli

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli.main(["node", "watch-spot", "--once", "--endpoint", f"http://127.0.0.1:{port}", "--interval", "0.01"])
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and summary["kind"] == "error" and summary["errors"] == 3, summary
    assert summary["error"].startswith(f"the metadata service is unavailable (3 tries): PUT http://127.0.0.1:{port}")
    assert "Traceback" not in err


def test_rebalance_only_when_configured_and_a_later_notice_tightens_the_deadline(imds):
    imds.answers[spot.AWS_REBALANCE_PATH] = (200, json.dumps({"noticeTime": iso(T0)}))
    drain = Recorder()
    watcher(imds, drain).run(max_polls=3)
    assert drain.calls == [] and imds.count("GET", spot.AWS_REBALANCE_PATH) == 0

    w = watcher(imds, drain, act_on_rebalance=True, rebalance_deadline=120)
    w.run(max_polls=3)
    assert len(drain.calls) == 1 and abs(drain.calls[0][0] - 120) < 1 and "rebalance" in drain.calls[0][1]
    imds.notice(at=T0 + 100)  # the real notice: earlier than the 120 s given for the rebalance -> drain again
    w.run(max_polls=w.polls + 3)
    assert len(drain.calls) == 2 and abs(drain.calls[1][0] - 100) < 1
    imds.notice("stop", at=T0 + 110)  # a new notice with a LATER deadline does not loosen Ray's deadline
    w.run(max_polls=w.polls + 3)
    assert len(drain.calls) == 2
    assert w.summary()["notices"][-1]["ignored"] == "already draining"


def test_stale_and_unreadable_notices(imds):
    imds.notice(at=T0 - 3600)  # an hour-old notice on a machine that is still up: ignored
    drain = Recorder()
    w = watcher(imds, drain)
    w.run(max_polls=3)
    assert drain.calls == [] and w.summary()["notices"][0]["ignored"] == "stale"
    imds.answers[spot.AWS_ACTION_PATH] = (200, "not json")  # a 200 is a notice: assume two minutes
    w.run(max_polls=w.polls + 2)
    assert len(drain.calls) == 1 and abs(drain.calls[0][0] - spot.AWS_NOTICE_S) < 1


def test_a_past_deadline_is_never_zero(imds):
    imds.notice(at=T0 - 5)
    drain = Recorder()
    watcher(imds, drain).run(once=True)
    assert drain.calls[0][0] == spot.MIN_REMAINING_S  # 0 would mean "no deadline" to Ray
    assert drain.deadlines == [T0 + spot.MIN_REMAINING_S]


def test_gcp_preempted_flag(imds):
    clock = [T0]
    drain = Recorder()
    source = spot.GcpMetadata(imds.url)
    w = spot.SpotWatcher(source, drain, interval=FAST, now=lambda: clock[0])
    w.run(max_polls=3)
    assert drain.calls == [] and imds.count("GET", spot.GCP_PREEMPTED_PATH, 200) == 3  # sent Metadata-Flavor
    imds.gcp_preempted = "TRUE"
    imds.failures = ["500"]
    clock[0] = T0 + 7
    w.run(max_polls=w.polls + 4)
    assert len(drain.calls) == 1 and abs(drain.calls[0][0] - 30) < 1 and "gcp-preempted" in drain.calls[0][1]
    assert w.errors == 1


def test_time_parsing():
    assert spot.parse_time("2026-11-29T17:10:00Z") == datetime(2026, 11, 29, 17, 10, tzinfo=timezone.utc).timestamp()
    assert spot.parse_time("2026-11-29T17:10:00") == spot.parse_time("2026-11-29T17:10:00+00:00")


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv(spot.ENDPOINT_ENV, "http://127.0.0.1:9")
    assert spot.make_source("aws").endpoint == "http://127.0.0.1:9"
    assert spot.make_source("gcp", "http://127.0.0.1:8").endpoint == "http://127.0.0.1:8"
    monkeypatch.delenv(spot.ENDPOINT_ENV)
    assert spot.make_source("aws").endpoint == "http://169.254.169.254"
    assert spot.make_source("gcp").endpoint == "http://metadata.google.internal"


# ----------------------------------------------------------------------------- command line


def test_module_command_once_prints_the_summary(imds, capsys):
    assert commands.main(["--endpoint", imds.url, "--once", "--interval", "0.01"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["command"] == "node watch-spot" and summary["polls"] == 1 and summary["drains"] == []


@pytest.mark.parametrize("argv", [["--endpoint", "ftp://x"], ["--interval", "0"], ["--node-id", "abc"],
                                  ["--provider", "gcp", "--act-on-rebalance"]])
def test_bad_flags_are_bad_input(argv, capsys):
    assert commands.main([*argv, "--once"]) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "bad_input"


def test_register_adds_node_watch_spot():
    import argparse

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["node", "watch-spot", "--provider", "gcp", "--interval", "0.5", "--once"])
    assert args.fn is commands.cmd_watch_spot and args.provider == "gcp" and args.interval == 0.5 and args.once


def test_pidfile_replaces_the_previous_watcher(tmp_path):
    # A stand-in for an older watcher: its command line names mmray.node.spot, as the real one's does.
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "mmray.node.spot"])
    pidfile = tmp_path / "watch.pid"
    pidfile.write_text(f"{old.pid}\n")
    try:
        deadline = time.monotonic() + 5
        while not spot._is_watcher(old.pid) and time.monotonic() < deadline:  # until its command line is readable
            time.sleep(0.01)
        spot.claim_pidfile(str(pidfile))
        assert old.wait(timeout=5) != 0  # terminated by SIGTERM
        assert pidfile.read_text().strip() == str(os.getpid())
        spot.release_pidfile(str(pidfile))
        assert not pidfile.exists()
    finally:
        if old.poll() is None:
            old.kill()
