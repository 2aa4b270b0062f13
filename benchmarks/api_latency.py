"""API latency under a steady open-loop load, and the API past its capacity.

For each database (SQLite, PostgreSQL) and number of API processes (`slimline api --workers N`)
this starts a real `slimline api` on a fresh database holding 100 jobs of one tenant, then:

* sends `GET /v1/jobs/{id}` and `GET /v1/jobs` at a fixed rate (50, 100, 200 requests/s by
  default) for `--duration` seconds each. The load is **open loop**: request i is due at
  `start + i / rate` whatever happened to the earlier ones, and its latency is measured from
  that due time (so a server that falls behind is charged for the queue it builds, including
  time spent waiting for a free client connection). p50/p99 are over the 2xx answers; every
  other outcome (non-2xx status, client timeout, connection error) is counted as an error;
* with `--overload-rate R` (400 by default; 0 = off) drives `GET /v1/jobs/{id}` at R/s for
  `--overload-s` seconds, reports what was answered per second and the error mix, then stops the
  load and probes every 0.2 s until the API answers normally (200 within 1 s, three times in a
  row): the recovery time. Last, SIGTERM: how long the process takes to exit (SIGKILL after
  30 s: "killed").

The load generator is one Python process (asyncio, raw HTTP/1.1 over keep-alive sockets, no
HTTP library) on the same machine as the API, so it takes a small share of the same cores; on a
2-core machine this is part of what is measured. Clients give up after `--client-timeout`
seconds (from the due time).

    python benchmarks/api_latency.py                       # sqlite+postgres, 1 and 2 processes
    python benchmarks/api_latency.py --db sqlite --workers 1 --rates 200 --duration 5
    python benchmarks/api_latency.py --code /path/to/other/checkout --label before

Markdown tables go to stdout, everything to benchmarks/out/api_latency[-LABEL].json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("SLIMLINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "train", "epochs": 2}, {"op": "evaluate"}], "queue": "cpu"}


# ---- a minimal HTTP/1.1 client (keep-alive connections, Content-Length or chunked bodies) ----

@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await reader.readexactly(size + 2))
            if size == 0:
                break
        body = b"".join(p[:-2] for p in parts)
    else:
        body = await reader.read()
    return status, headers, body


class Client:
    """Requests over a pool of at most `max_conns` keep-alive connections. Like an HTTP client
    library, it does not reuse a connection idle for longer than MAX_IDLE_S (the server may
    have closed it: uvicorn's keep-alive timeout is 5 s), and it resends a request once on a
    new connection when a reused one turns out closed before any byte of the answer."""

    MAX_IDLE_S = 2.0

    def __init__(self, port: int, max_conns: int) -> None:
        self.port = port
        self.idle: list[Conn] = []
        self.slots = asyncio.Semaphore(max_conns)

    def _reusable(self) -> Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since < self.MAX_IDLE_S:
                return conn
            conn.writer.close()
        return None

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()
        async with self.slots:
            conn = self._reusable()
            reused = conn is not None
            while True:
                if conn is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    conn = Conn(reader, writer)
                try:
                    conn.writer.write(request)
                    status, rheaders, _ = await read_response(conn.reader)
                    break
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    conn.writer.close()
                    partial = getattr(exc, "partial", b"")
                    if not reused or partial:
                        raise
                    conn, reused = None, False  # the server had closed it: resend once
                except BaseException:
                    conn.writer.close()
                    raise
            if rheaders.get("connection", "").lower() == "close":
                conn.writer.close()
            else:
                conn.idle_since = time.monotonic()
                self.idle.append(conn)
            return status, rheaders

    def close(self) -> None:
        for conn in self.idle:
            conn.writer.close()
        self.idle.clear()


@dataclass
class Outcome:
    due: float  # seconds since the run started
    latency: float | None  # None: no answer
    status: int | None
    error: str | None = None
    retry_after: str | None = None


@dataclass
class Load:
    rate: float
    seconds: float
    path: str
    headers: dict[str, str]
    timeout: float
    outcomes: list[Outcome] = field(default_factory=list)


async def run_load(client: Client, load: Load, *, wait_for_answers: bool = True) -> float:
    """Send `rate` requests/s for `seconds` on a fixed schedule; returns the run's start time
    (loop clock). With `wait_for_answers=False` it returns when the last request is due, and the
    outstanding ones keep running (call `drain`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = round(load.rate * load.seconds)

    async def one(due: float) -> None:
        try:
            status, headers = await asyncio.wait_for(client.get(load.path, load.headers),
                                                     timeout=max(0.01, due + load.timeout
                                                                 - loop.time()))
            load.outcomes.append(Outcome(due - start, loop.time() - due, status,
                                         retry_after=headers.get("retry-after")))
        except TimeoutError:
            load.outcomes.append(Outcome(due - start, None, None, "timeout"))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            load.outcomes.append(Outcome(due - start, None, None, type(exc).__name__))

    tasks = []
    for i in range(n):
        due = start + i / load.rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    load.tasks = tasks  # type: ignore[attr-defined]
    if wait_for_answers:
        await asyncio.gather(*tasks)
    return start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def summarize(load: Load) -> dict[str, Any]:
    ok = [o.latency for o in load.outcomes if o.status is not None and 200 <= o.status < 300]
    errors = Counter(str(o.status) if o.status is not None else o.error
                     for o in load.outcomes if o.status is None or not 200 <= o.status < 300)
    sent = len(load.outcomes)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {"rate": load.rate, "seconds": load.seconds, "sent": sent, "ok": len(ok),
            "errors": sum(errors.values()), "error_mix": dict(errors),
            "p50_ms": ms(percentile(ok, 0.50)), "p90_ms": ms(percentile(ok, 0.90)),
            "p99_ms": ms(percentile(ok, 0.99)), "max_ms": ms(max(ok) if ok else None),
            "mean_ms": ms(statistics.fmean(ok) if ok else None)}


# ---- the server under test ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def database(kind: str, home: Path):
    """A fresh database URL (SQLite file under `home`, or a new PostgreSQL database)."""
    if kind == "sqlite":
        yield f"sqlite:///{home / 'slimline.db'}"
        return
    import psycopg

    name = f"slimline_bench_api_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The `slimline` app of the measured checkout, run in it (cli/app.py; jobs/cli.py before it
# moved); decided by the checkout's files, not by what the installed package would import.
RUN_CLI = """
import os
if os.path.exists(os.path.join("cli", "app.py")):
    from cli.app import app
else:
    from service.cli import app
app()
"""
SEED = """
import json, sys
from service.auth import create_api_key
from service.db import session_scope, upgrade_db
from service.orm import Job
from service.settings import get_settings
s = get_settings()
upgrade_db(s)
with session_scope(s) as session:
    key = create_api_key(session, "bench", "bench")
with session_scope(s) as session:
    from service.orm import ApiKey
    from sqlalchemy import select
    tenant = session.scalar(select(ApiKey.tenant_id))
    jobs = [Job(tenant_id=tenant, status="succeeded", progress=1.0, stage="done",
                spec=json.loads(sys.argv[1]), queue="cpu", cancel_requested=False, attempts=1,
                result={"model_id": "m" * 26, "metrics": {"accuracy": 0.9, "params": 266200}})
            for _ in range(100)]
    session.add_all(jobs)
    session.flush()
    job_id = jobs[-1].id
print(json.dumps({"key": key, "job_id": job_id}))
"""


class Server:
    def __init__(self, code: Path, env: dict[str, str], workers: int, log: Path) -> None:
        self.port = free_port()
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUN_CLI, "api",
             "--port", str(self.port), "--workers", str(workers)],
            cwd=code, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the API exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
            time.sleep(0.2)
        raise RuntimeError("the API did not become ready")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the API's processes (its process
        group: with --workers, the supervisor and every worker process)."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # fields[2]: the process group
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def terminate(self, timeout: float = 30.0) -> dict[str, Any]:
        """SIGTERM, then SIGKILL (the whole group) after `timeout` s."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
            result = {"exit_s": round(time.monotonic() - started, 2), "exit_code": code}
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            result = {"exit_s": None, "exit_code": f"killed after {timeout:.0f} s"}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover uvicorn children, if any
        self.log.close()
        return result


async def probe_recovery(port: int, path: str, headers: dict[str, str],
                         limit_s: float) -> float | None:
    """Seconds until three probes in a row answer 200 within 1 s (None: not within limit_s)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    streak, first_good = 0, None
    while loop.time() - start < limit_s:
        t = loop.time()
        client = Client(port, 1)
        try:
            status, _ = await asyncio.wait_for(client.get(path, headers), 1.0)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            status = None
        client.close()
        if status == 200:
            first_good = t if streak == 0 else first_good
            streak += 1
            if streak == 3:
                return round(first_good - start, 2)
        else:
            streak = 0
        await asyncio.sleep(max(0.0, 0.2 - (loop.time() - t)))
    return None


async def bench_one(args: argparse.Namespace, db: str, workers: int, url: str,
                    home: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
    env |= {"SLIMLINE_HOME": str(home), "SLIMLINE_DATABASE_URL": url, "SLIMLINE_AUTH": "on",
            "PYTHONPATH": str(args.code)}
    env |= dict(kv.split("=", 1) for kv in args.env)
    seed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", SEED, json.dumps(SPEC)], cwd=args.code, env=env,
        check=True, capture_output=True, text=True)
    seeded = json.loads(seed.stdout.strip().splitlines()[-1])
    headers = {"Authorization": f"Bearer {seeded['key']}"}
    paths = {"GET /v1/jobs/{id}": f"/v1/jobs/{seeded['job_id']}", "GET /v1/jobs": "/v1/jobs"}
    measured = {name: path for name, path in paths.items()
                if ("one" if "{id}" in name else "list") in args.endpoints}
    result: dict[str, Any] = {"db": db, "workers": workers, "fresh_server_per_run": args.fresh,
                              "steady": [], "overload": None, "sigterm": None}
    server: Server | None = None
    client: Client | None = None
    n_servers = 0

    async def start() -> tuple[Server, Client]:
        nonlocal n_servers
        n_servers += 1
        srv = Server(args.code, env, workers, home / f"api-{db}-{workers}-{n_servers}.log")
        srv.wait_ready()
        cl = Client(srv.port, args.max_conns)
        for path in paths.values():  # warm-up: connections, caches, the pool
            await run_load(cl, Load(50, 2, path, headers, args.client_timeout))
        return srv, cl

    def stop(srv: Server, cl: Client | None) -> dict[str, Any]:
        if cl is not None:
            cl.close()
        outcome = srv.terminate(timeout=15 if args.fresh else 30)
        print(f"  {db} x{workers} SIGTERM: {outcome}", file=sys.stderr)
        return outcome

    try:
        for name, path in measured.items():
            for rate in args.rates:
                if server is None or args.fresh:
                    if server is not None:
                        stop(server, client)
                    server, client = await start()
                load = Load(rate, args.duration, path, headers, args.client_timeout)
                cpu = server.cpu_s()
                await run_load(client, load)
                cpu = server.cpu_s() - cpu
                row = {"endpoint": name} | summarize(load) | {
                    "api_cpu_ms_per_request": round(1000 * cpu / max(1, len(load.outcomes)), 3),
                    "api_cpu_share": round(cpu / load.seconds, 3)}
                result["steady"].append(row)
                print(f"  {db} x{workers} {name} {rate:g}/s: p50 {row['p50_ms']} ms, "
                      f"p99 {row['p99_ms']} ms, errors {row['errors']}, API CPU "
                      f"{row['api_cpu_ms_per_request']} ms/request", file=sys.stderr)
                await asyncio.sleep(1)
        if args.overload_rate:
            if args.fresh:
                stop(server, client)
                server, client = await start()
            client.close()
            client = None
            result["overload"] = await overload(args, server, paths["GET /v1/jobs/{id}"],
                                                headers)
    finally:
        if server is not None:
            result["sigterm"] = stop(server, client)
            if result["overload"] is not None:
                result["overload"]["sigterm"] = result["sigterm"]
    return result


async def overload(args: argparse.Namespace, server: Server, path: str,
                   headers: dict[str, str]) -> dict[str, Any]:
    client = Client(server.port, args.max_conns)
    load = Load(args.overload_rate, args.overload_s, path, headers, args.client_timeout)
    loop = asyncio.get_running_loop()
    start = await run_load(client, load, wait_for_answers=False)
    stopped = loop.time()
    recovery = await probe_recovery(server.port, path, headers, args.recovery_limit)
    # what is still outstanding gives up at its client timeout
    await asyncio.gather(*load.tasks, return_exceptions=True)  # type: ignore[attr-defined]
    client.close()
    summary = summarize(load)
    answered = [o for o in load.outcomes if o.status is not None]
    by_second: dict[int, Counter] = {}
    for o in answered:
        by_second.setdefault(int(o.due + o.latency), Counter())[o.status] += 1
    ok_during = sum(1 for o in answered if 200 <= o.status < 300 and o.due + o.latency
                    <= stopped - start)
    shed = [o for o in answered if o.status in (429, 503)]
    summary |= {
        "answered_ok_per_s_during_load": round(ok_during / args.overload_s, 1),
        "answered_per_s_during_load": round(sum(
            1 for o in answered if o.due + o.latency <= stopped - start) / args.overload_s, 1),
        "shed_with_retry_after": sum(1 for o in shed if o.retry_after),
        "shed_p99_ms": (round(percentile([o.latency for o in shed], 0.99) * 1000, 2)
                        if shed else None),
        "recovery_s": recovery,
        "answers_by_second": {str(k): dict(v) for k, v in sorted(by_second.items())}}
    print(f"  overload {args.overload_rate}/s: {summary['answered_ok_per_s_during_load']} ok/s, "
          f"mix {summary['error_mix']}, recovery {recovery} s", file=sys.stderr)
    return summary


def tables(results: list[dict[str, Any]], label: str) -> str:
    fresh = any(r.get("fresh_server_per_run") for r in results)
    title = (f"### API latency{f' ({label})' if label else ''}: open-loop load, p50 / p99 of "
             "the 2xx answers in ms, errors"
             + (" (a new API process for every row)" if fresh else "") + "\n")
    out = [title,
           "| database | API processes | endpoint | req/s | p50 ms | p99 ms | errors |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r["steady"]:
            out.append(f"| {r['db']} | {r['workers']} | `{s['endpoint']}` | {s['rate']:g} | "
                       f"{s['p50_ms']} | {s['p99_ms']} | {s['errors']}"
                       + (f" {s['error_mix']}" if s["errors"] else "") + " |")
    over = [r for r in results if r["overload"]]
    if over:
        out += ["", ("| database | API processes | overload req/s | 2xx answered/s | answers "
                     "(status: count) | shed p99 ms | recovery after load stops "
                     "| SIGTERM → exit |"),
                "|---|---|---|---|---|---|---|---|"]
        for r in over:
            o = r["overload"]
            mix = {"200": o["ok"]} | o["error_mix"]
            rec = (f"not within {o.get('recovery_limit', 0):.0f} s" if o["recovery_s"] is None
                   else f"{o['recovery_s']} s")
            term = r["sigterm"]
            term_s = f"{term['exit_s']} s (code {term['exit_code']})" if term["exit_s"] is not \
                None else str(term["exit_code"])
            out.append(f"| {r['db']} | {r['workers']} | {o['rate']:g} | "
                       f"{o['answered_ok_per_s_during_load']} | {mix} | {o['shed_p99_ms']} | "
                       f"{rec} | {term_s} |")
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for db in args.db:
        for workers in args.workers:
            with tempfile.TemporaryDirectory(prefix="slimline-bench-api-") as tmp:
                home = Path(tmp)
                with database(db, home) as url:
                    r = await bench_one(args, db, workers, url, home)
                if r["overload"]:
                    r["overload"]["recovery_limit"] = args.recovery_limit
                results.append(r)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", nargs="+", choices=["sqlite", "postgres"],
                   default=["sqlite", "postgres"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2],
                   help="API processes (slimline api --workers N)")
    p.add_argument("--rates", nargs="+", type=float, default=[50, 100, 200])
    p.add_argument("--endpoints", nargs="+", choices=["one", "list"], default=["one", "list"],
                   help="GET /v1/jobs/{id} (one), GET /v1/jobs (list)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    p.add_argument("--overload-rate", type=float, default=400.0, help="0: skip the overload run")
    p.add_argument("--overload-s", type=float, default=10.0)
    p.add_argument("--recovery-limit", type=float, default=60.0)
    p.add_argument("--client-timeout", type=float, default=10.0)
    p.add_argument("--max-conns", type=int, default=1000, help="client connections at most")
    p.add_argument("--code", type=Path, default=ROOT,
                   help="the checkout whose `slimline api` is measured")
    p.add_argument("--fresh", action="store_true",
                   help="a new API process for every rate (a run that breaks the API then "
                        "does not spoil the next ones)")
    p.add_argument("--env", nargs="*", default=[], help="extra KEY=VALUE for the API")
    p.add_argument("--label", default="", help="names the output file and the table")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.code = args.code.resolve()
    started = time.time()
    results = asyncio.run(main_async(args))
    table = tables(results, args.label)
    print(table)
    out = args.out or ROOT / "benchmarks" / "out" / (
        f"api_latency{'-' + args.label if args.label else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_generator": "one asyncio process, raw HTTP/1.1 keep-alive, same machine",
            "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "runtime_s": round(time.time() - started, 1)}
    out.write_text(json.dumps({"meta": meta, "results": results, "table_md": table}, indent=1))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
