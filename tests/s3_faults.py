"""A fault-injecting HTTP proxy for S3 tests: it sits on 127.0.0.1 in front of an S3 endpoint (moto's server) and,
by request count, answers 503 SlowDown or drops the connection.

    proxy = FaultyS3Proxy(s3_endpoint, fail_every=4, drop_every=7).start()
    ... point a client at proxy.url ...
    proxy.stop(); proxy.counters  # {"requests": N, "slowdowns": ..., "drops": ...}

Request k (1-based) is answered with 503 SlowDown when k % fail_every == 0; else, when k % drop_every == 0, its
connection is reset (RST). ``drop_at="response"`` (reads) forwards the request and cuts the answer off after half of
its body (or before any answer when it has none); ``drop_at="request"`` (uploads) resets before forwarding, so the
upload never arrives. 0 disables a fault; fail_every=1 makes the endpoint fail every request. Requests are forwarded
byte for byte (method, path, query, headers, body; chunked uploads de-chunked), so signatures and ranges reach the
server unchanged.
"""
from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hung up on a fault: expected here
        pass


class FaultyS3Proxy:
    """An HTTP proxy on 127.0.0.1 that injects S3 throttling (503 SlowDown) and dropped connections."""

    def __init__(self, target_url: str, fail_every: int = 0, drop_every: int = 0, drop_at: str = "response"):
        if drop_at not in ("response", "request"):
            raise ValueError(f"drop_at must be 'response' or 'request', got {drop_at!r}")
        target = urlparse(target_url)
        self.target_host, self.target_port = target.hostname, target.port or 80
        self.fail_every, self.drop_every, self.drop_at = fail_every, drop_every, drop_at
        self.counters = {"requests": 0, "slowdowns": 0, "drops": 0}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyS3Proxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _fault(self) -> str:
        with self._lock:
            self.counters["requests"] += 1
            k = self.counters["requests"]
            if self.fail_every and k % self.fail_every == 0:
                self.counters["slowdowns"] += 1
                return "slowdown"
            if self.drop_every and k % self.drop_every == 0:
                self.counters["drops"] += 1
                return "drop"
            return ""

    @staticmethod
    def _body(handler: BaseHTTPRequestHandler) -> bytes | None:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(handler.rfile.readline().split(b";")[0], 16):
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
            while handler.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else None

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        body = self._body(handler)
        fault = self._fault()
        if fault == "slowdown":
            handler.send_response(503, "Slow Down")
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(SLOW_DOWN)))
            handler.end_headers()
            if handler.command != "HEAD":  # a HEAD answer has no body; bytes sent anyway would start the next answer
                handler.wfile.write(SLOW_DOWN)
            return
        if fault == "drop" and self.drop_at == "request":
            self._drop(handler)
            return
        conn = http.client.HTTPConnection(self.target_host, self.target_port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if fault == "drop" and (handler.command == "HEAD" or len(data) < 2):
            self._drop(handler)  # nothing to cut in half: drop before answering
            return
        handler.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            # A HEAD answer's Content-Length is the object's size, kept as it is; a body's is its own length.
            if key.lower() not in _HOP_BY_HOP and (key.lower() != "content-length" or handler.command == "HEAD"):
                handler.send_header(key, value)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        if fault == "drop":
            handler.wfile.write(data[:len(data) // 2])
            handler.wfile.flush()
            self._drop(handler)
            return
        handler.wfile.write(data)

    @staticmethod
    def _drop(handler: BaseHTTPRequestHandler) -> None:
        """Reset the client's connection (RST, not a clean close), as a dropped connection looks to it."""
        handler.close_connection = True
        sock = handler.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
