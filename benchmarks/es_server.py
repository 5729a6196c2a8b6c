"""Start and stop an Elasticsearch-API test server (PyPI's ``noida-db``, an emulator).

Used by the benchmarks and by the test suite (which imports it from here: tests depend on
benchmarks, never the reverse)::

    with EsServer() as server:           # or: server = EsServer().start(); ...; server.stop()
        print(server.url)                # http://127.0.0.1:<free port>

The server runs as a child process on a free loopback port with its data in a
temporary folder, and is stopped by its PID (terminate, then kill). Figures
measured against it are emulator figures, not Elasticsearch's.
"""
from __future__ import annotations

import http.client
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit


def find_binary() -> Optional[str]:
    """The ``noida-db`` server binary shipped inside the ``noida_db`` package, or the one on PATH.

    The package's console script is a Python wrapper that starts the binary as a
    child; running the binary itself means the PID we stop is the server's.
    """
    spec = importlib.util.find_spec("noida_db")
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            binary = Path(folder) / "noida-db"
            if binary.is_file() and os.access(binary, os.X_OK):
                return str(binary)
    here = Path(sys.executable).parent / "noida-db"
    if here.exists():
        return str(here)
    return shutil.which("noida-db")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EsServer:
    """A noida-db Elasticsearch emulator on ``127.0.0.1:<port>``."""

    def __init__(self, port: Optional[int] = None, data_dir: Optional[str] = None, startup_timeout: float = 30.0):
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="vs-es-")
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self._log = None
        self.log_path = Path(self.data_dir) / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "EsServer":
        binary = find_binary()
        if binary is None:
            raise RuntimeError("noida-db is not installed: pip install noida-db==0.2.3 (or set VS_ES_URL to a cluster)")
        data = Path(self.data_dir) / "data"
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [binary, "start", "--only", "elasticsearch", "--host", "127.0.0.1",
                 "--elasticsearch-port", str(self.port), "--data-dir", str(data)],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            self._wait_until_up()
        except BaseException:  # a failed start or Ctrl-C while waiting: never leave the server running
            self.stop()
            raise
        return self

    def _wait_until_up(self) -> None:
        """Poll the server until it answers 200; raise (with its log, read before stop() deletes it) if not."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"noida-db exited with status {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"noida-db did not answer on {self.url} within {self.startup_timeout:g} s: "
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server by its PID: SIGTERM, then SIGKILL after 10 s; remove its temp data.

        The signal goes to the process group the server leads (it was started in a
        session of its own), so a wrapper's child cannot outlive it.
        """
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ThrottlingProxy:
    """An HTTP proxy in front of an Elasticsearch URL that answers 429 to the first ``reject`` bulk requests.

    A busy cluster answers ``429 Too Many Requests`` (``es_rejected_execution_exception``)
    when its write queue is full; this stands in for that in front of any server (the
    emulator never throttles). Every other request is forwarded unchanged::

        with ThrottlingProxy(es_url, reject=3) as proxy:   # proxy.url, proxy.rejected, proxy.forwarded
            ...
    """

    def __init__(self, upstream: str, reject: int = 3, paths: tuple = ("/_bulk",)):
        self.upstream = urlsplit(upstream)
        self.reject, self.paths = reject, paths
        self.rejected = self.forwarded = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if any(self.path.split("?")[0].endswith(p) for p in proxy.paths):
                    with proxy._lock:
                        throttle = proxy.rejected < proxy.reject
                        proxy.rejected += throttle
                    if throttle:
                        payload = (b'{"error":{"type":"es_rejected_execution_exception","reason":"rejected '
                                   b'execution (write queue full; test proxy)"},"status":429}')
                        self.send_response(429)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("X-Elastic-Product", "Elasticsearch")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.forwarded += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "ThrottlingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":  # python benchmarks/es_server.py: run one until Ctrl-C
    with EsServer() as s:
        print(f"Elasticsearch emulator at {s.url} (pid {s.proc.pid}); Ctrl-C stops it", flush=True)
        try:
            s.proc.wait()
        except KeyboardInterrupt:
            pass
