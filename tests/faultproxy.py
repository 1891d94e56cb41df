"""A fault-injecting HTTP proxy for the S3 protocol, on 127.0.0.1, in front of moto's server.

Tests point `AWS_ENDPOINT_URL` at it; requests go through to the real server unless a rule
matches, then the proxy answers `503 SlowDown` (as S3 does when throttling) or drops the
connection without an answer (a network blip). Rules match a method and a regular
expression over the path, and fire on every `every`-th matching request, at most `times`
times in all.

    with FaultProxy(upstream) as proxy:
        proxy.add(Rule(method="GET", path=r"\\.distcp", action="503", every=2, times=6))
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b'<Message>Please reduce your request rate.</Message></Error>')
_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                  b'<Message>Access Denied</Message></Error>')
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


@dataclass
class Rule:
    method: str = ""
    """'' matches any method."""
    path: str = ""
    """A regular expression searched in the request path (with the query)."""
    action: str = "503"
    """'503' (SlowDown), '403' (AccessDenied: a bucket policy that refuses the write) or
    'drop' (close the connection, no answer)."""
    every: int = 1
    times: int = 1_000_000
    seen: int = 0
    fired: int = 0

    def fires(self, method: str, path: str) -> bool:
        if (self.method and method != self.method) or not re.search(self.path, path):
            return False
        self.seen += 1
        if self.fired < self.times and self.seen % self.every == 0:
            self.fired += 1
            return True
        return False


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    requests: int = 0
    faults: int = 0

    def __post_init__(self) -> None:
        target = urlsplit(self.upstream)
        self._host, self._port = target.hostname, target.port
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self._lock:
            self.requests += 1
            rule = next((r for r in self.rules if r.fires(h.command, h.path)), None)
            if rule is not None:
                self.faults += 1
        if rule is not None and rule.action == "drop":
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if rule is not None:
            status, body = (403, _ACCESS_DENIED) if rule.action == "403" else (503, _SLOW_DOWN)
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
            return
        conn = http.client.HTTPConnection(self._host, self._port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        h.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            lower = key.lower()
            if lower in _HOP_BY_HOP or lower in ("server", "date"):
                continue
            if lower == "content-length" and h.command != "HEAD":
                continue  # recomputed below; a HEAD's tells the object's size
            h.send_header(key, value)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
