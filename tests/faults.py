"""A small fault-injecting HTTP proxy for retry tests.

It forwards requests to an upstream (the S3 test server) and, for the first
requests matching a rule, answers 503 or drops the connection without a
response, the way a flaky load balancer does; it can also drop chosen headers (a
store that ignores them). It also records what went over the wire (headers and
status of every forwarded request). Runs on loopback only.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    headers: dict[str, str]  # as the client sent them, on the wire
    status: int  # the upstream's answer


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.faults: list[str] = []  # queue of "503" | "drop", consumed one per request
        self.match = ""  # only requests whose path contains this are faulted
        self.seen: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self.exchanges: list[Exchange] = []  # every forwarded request's headers and the upstream's status
        # Headers dropped before forwarding (lower case): {"if-none-match"} makes the upstream behave like a
        # store that ignores conditional writes.
        self.strip_headers: set[str] = set()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = None
                with proxy.lock:
                    if proxy.faults and proxy.match in self.path:
                        fault = proxy.faults.pop(0)
                    proxy.seen.append((self.command, self.path, fault or "forwarded"))
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "503":
                    payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() != "host" and k.lower() not in proxy.strip_headers}
                headers["Host"] = f"{proxy.upstream.hostname}:{proxy.upstream.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with proxy.lock:
                    proxy.exchanges.append(Exchange(self.command, self.path, dict(self.headers.items()), resp.status))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the size of the object: pass the upstream's on
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
