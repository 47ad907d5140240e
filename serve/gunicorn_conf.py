"""gunicorn settings of the endpoint's server: azmlinfsrv runs gunicorn, which loads this file from
GUNICORN_CMD_ARGS="--config python:serve.gunicorn_conf" (serve.codefolder.deployment_environment_variables;
azmlinfsrv puts AML_APP_ROOT, the code folder, on sys.path first). azmlinfsrv's own command line
(-b, -w from WORKER_COUNT, --timeout from WORKER_TIMEOUT) wins over this file.

What azureml-inference-server-http 1.5.1 honours (read in its amlserver.py, amlserver_linux.py and
server/config.py): WORKER_COUNT, WORKER_TIMEOUT (gunicorn's worker heartbeat, not a request
timeout), WORKER_PRELOAD, SCORING_TIMEOUT_MS (SIGALRM: never fires in a threaded worker, so the
deadline lives in serve.engine.Batcher instead), and GUNICORN_CMD_ARGS for everything else.

Slow clients. gunicorn's gthread worker (27.0.1) waits 5 s for a connection's first bytes
without a thread, but once bytes arrive it reads the request on a pool thread with a blocking
socket and no time limit: `threads` connections trickling their headers starve every other
client. `post_worker_init` below gives each request one read deadline (`serve.read_timeout_s`)
for its headers and body together; a client that has not sent its whole request by then is
treated as gone, and its thread is free again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

_CONFIG_FILE = Path(__file__).resolve().parent / "serve_config.json"
_serve = json.loads(_CONFIG_FILE.read_text(encoding="utf-8")) if _CONFIG_FILE.is_file() else {}

worker_class = "gthread"
threads = int(_serve.get("threads", 16))
# Connections a worker holds at once (in requests, kept alive or waiting for their first bytes);
# beyond it the worker stops accepting and connections wait in the kernel's backlog.
worker_connections = 4 * threads
backlog = 256
keepalive = 5
READ_TIMEOUT_S = float(_serve.get("read_timeout_s", 10.0))


class DeadlineSocket:
    """A client socket whose reads share one deadline per request. Past it, a read returns b""
    (end of stream), which gunicorn's parser treats as a client that hung up."""

    def __init__(self, sock, timeout_s: float):
        self._sock = sock
        self.timeout_s = timeout_s
        self.deadline: float | None = None

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def start(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    def recv(self, size: int, *flags) -> bytes:
        if self.deadline is None:
            return self._sock.recv(size, *flags)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return b""
        prior = self._sock.gettimeout()
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(size, *flags)
        except TimeoutError:
            return b""
        finally:
            self._sock.settimeout(prior)


def limit_request_reads(worker, timeout_s: float) -> bool:
    """Wrap a gthread worker's connections in DeadlineSocket, restarting the deadline per request."""
    from gunicorn.workers.gthread import ThreadWorker

    if not isinstance(worker, ThreadWorker):
        return False
    handle = worker.handle

    def handle_with_deadline(conn):
        if not conn.initialized and not isinstance(conn.sock, DeadlineSocket):
            conn.sock = DeadlineSocket(conn.sock, timeout_s)  # before init() builds the parser on it
        if isinstance(conn.sock, DeadlineSocket):
            conn.sock.start()
        return handle(conn)

    worker.handle = handle_with_deadline  # enqueue_req submits self.handle, looked up per request
    return True


def post_worker_init(worker):
    if limit_request_reads(worker, READ_TIMEOUT_S):
        worker.log.info("request read deadline %.3g s (serve.read_timeout_s)", READ_TIMEOUT_S)
