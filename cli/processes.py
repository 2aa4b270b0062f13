"""Running the stack's processes: the Celery worker command line, stopping a child process,
SIGTERM as a clean exit, and uvicorn's socket fix for `slimline api --workers N`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

API_GRACEFUL_SHUTDOWN_S = 10  # on SIGTERM: finish in-flight requests this long, then close
API_KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long


def worker_command(queues: str, concurrency: int = 1, pool: str = "prefork",
                   loglevel: str = "INFO") -> list[str]:
    """The Celery worker command line (one job per process; see worker/celery_app.py)."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
            "-Q", queues, "-c", str(concurrency), "--pool", pool, "--loglevel", loglevel,
            "--without-gossip", "--without-mingle"]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0, group: bool = False
                 ) -> None:
    """SIGTERM (warm shutdown), then SIGKILL after `timeout` seconds."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=10)


def exit_cleanly(_signum: int, _frame: object) -> None:
    """A SIGTERM handler: a stop that was asked for is a clean exit (SystemExit(0))."""
    raise SystemExit(0)


def keep_tcp_nodelay(config_class: Any) -> None:
    """With --workers, uvicorn binds the listening socket itself with `proto` 0; the accepted
    sockets inherit it and asyncio then leaves Nagle's algorithm on (it sets TCP_NODELAY only
    for IPPROTO_TCP), so every keep-alive response waits ~40 ms for the client's delayed ACK
    (uvicorn issue #3149). Re-wrap the bound socket with its real protocol."""
    import socket

    bind_socket = config_class.bind_socket
    if getattr(bind_socket, "keeps_nodelay", False):
        return

    def bind_tcp_socket(self: Any) -> socket.socket:
        sock: socket.socket = bind_socket(self)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
            sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP,
                                 fileno=sock.detach())
            sock.set_inheritable(True)
        return sock

    bind_tcp_socket.keeps_nodelay = True  # type: ignore[attr-defined]
    config_class.bind_socket = bind_tcp_socket
