"""A loopback TCP relay that caps each connection's bandwidth and adds latency.

Real object stores serve one stream at a bounded rate (tens to a few hundred
MB/s per connection on S3) and scale with parallel streams; a server on
loopback does not show that. Benchmarks put this relay in front of the S3
test server so "parallel multipart vs sequential single-part" is measured
under the same per-stream limit a real store imposes. It listens on
127.0.0.1 only and forwards to one upstream address.
"""

from __future__ import annotations

import socket
import threading
import time


class ThrottledRelay:
    def __init__(self, upstream_host: str, upstream_port: int, *, mbytes_per_s: float = 25.0,
                 latency_ms: float = 5.0):
        self.upstream = (upstream_host, upstream_port)
        self.rate = mbytes_per_s * 1024 * 1024
        self.latency = latency_ms / 1000.0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> ThrottledRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        time.sleep(self.latency)  # connection setup round trip
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        start = time.monotonic()
        sent = 0
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
                ahead = sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
