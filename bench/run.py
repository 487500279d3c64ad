"""Benchmark kaiju-tasks against pgqueuer and procrastinate on one local PostgreSQL.

    python bench/run.py                      # everything (a few minutes)
    python bench/run.py --quick              # smoke run, scaled down
    python bench/run.py --scenarios b,d --systems kaiju,pgqueuer --profile py-spy

Scenarios (each system, same server, its own freshly created database per scenario):
  a  bulk enqueue N no-op jobs with the system's bulk API (median of 5, the
     systems taking turns)                                                    -> jobs/s
  b  drain those N jobs with one worker process, concurrency 10               -> jobs/s
  c  create->first-stage-start latency, idle worker, 200 jobs 20 ms apart     -> p50/p95/p99 ms
  d  drain 3,000 3-stage pipelines (kaiju: templates; peers: enqueue next job from the handler)
                                                                              -> pipelines/s

Results: one JSON line per (system, scenario, metric) on stdout and in bench/results.jsonl,
then a table (kaiju / best peer). Progress and diagnostics go to stderr; worker logs to
bench/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from bench import common  # noqa: E402

BENCH = ROOT / "bench"
SYSTEMS = ("kaiju", "pgqueuer", "procrastinate")
SCENARIOS = ("a", "b", "c", "d")
PACKAGES = {"kaiju": "kaiju-tasks", "pgqueuer": "pgqueuer", "procrastinate": "procrastinate"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_system(name: str) -> common.System:
    if name == "kaiju":
        from bench.kaiju import Kaiju

        return Kaiju()
    if name == "pgqueuer":
        from bench.peers.pgqueuer_peer import PgQueuerPeer

        return PgQueuerPeer()
    from bench.peers.procrastinate_peer import ProcrastinatePeer

    return ProcrastinatePeer()


def version(system: str) -> str:
    try:
        return importlib.metadata.version(PACKAGES[system])
    except importlib.metadata.PackageNotFoundError:
        return "?"


def proc_cpu(pid: int) -> float | None:
    """utime + stime of a process in seconds (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def backends_cpu(connection: asyncpg.Connection, database: str) -> float:
    """CPU seconds used so far by the server backends connected to ``database``."""
    pids = await connection.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        database,
    )
    return sum(cpu for row in pids if (cpu := proc_cpu(row["pid"])) is not None)


# -- worker processes ---------------------------------------------------------------------------

LIVE: set[asyncio.subprocess.Process] = set()


class Worker:
    """A worker subprocess (bench/worker.py) and what it reports on stdout."""

    def __init__(self, system: str, label: str, args: argparse.Namespace) -> None:
        self.system = system
        self.label = label
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()
        self.done_ts: float | None = None
        self.latencies: list[float] = []
        self.stats: dict[str, Any] = {}
        self._reader: asyncio.Task[None] | None = None
        self._spy: asyncio.subprocess.Process | None = None
        self.profile_path: Path | None = None

    async def start(self, dsn: str, mode: str, expect: int) -> None:
        command = [sys.executable, "-m", "bench.worker", self.system, "--dsn", dsn]
        command += ["--mode", mode, "--expect", str(expect)]
        command += ["--concurrency", str(self.args.concurrency)]
        if self.args.trace:
            command.append("--trace")
        profiling = self.args.profile and self.system in self.args.profile_systems
        if profiling and self.args.profile == "pyinstrument":
            self.profile_path = self.args.profile_dir / f"{self.label}.txt"
            command += ["--pyinstrument", str(self.profile_path)]
        (BENCH / "logs").mkdir(exist_ok=True)
        stderr = (BENCH / "logs" / f"{self.label}.log").open("wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *command,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,  # our Ctrl-C does not hit it; we stop it ourselves
            )
        finally:
            stderr.close()
        LIVE.add(self.proc)
        self._reader = asyncio.create_task(self._read())

    async def attach_profiler(self) -> None:
        """With --profile py-spy: sample the worker from now on (after its imports and start)."""
        if self.args.profile != "py-spy" or self.system not in self.args.profile_systems:
            return
        self.profile_path = self.args.profile_dir / f"{self.label}.raw"
        self._spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(self.profile_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        LIVE.add(self._spy)

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            kind, _, rest = raw.decode().strip().partition(" ")
            if kind == "READY" and not self.ready.done():
                self.ready.set_result(float(rest))
            elif kind == "LAT":
                self.latencies.append(float(rest))
            elif kind == "DONE":
                self.done_ts = float(rest)
                self.done.set()
            elif kind == "STAT":
                self.stats.update(json.loads(rest))
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"worker {self.label} exited before READY"))
        self.done.set()  # wake waiters; they check the database and the exit code

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is None or self.proc.returncode is not None

    async def stop_profiler(self) -> None:
        if self._spy is not None and self._spy.returncode is None:
            self._spy.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self._spy.wait(), 20)
            except TimeoutError:
                _kill(self._spy)
            LIVE.discard(self._spy)

    async def stop(self) -> None:
        await self.stop_profiler()
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                log(f"worker {self.label} did not stop in 20 s: killing it")
                _kill(self.proc)
                await self.proc.wait()
        # Anything it started in its session goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        LIVE.discard(self.proc)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, signal.SIGKILL)


def kill_all() -> None:
    for proc in list(LIVE):
        if proc.returncode is None:
            _kill(proc)
    LIVE.clear()


async def wait_completed(
    connection: asyncpg.Connection, sql: str, target: int, worker: Worker, deadline: float
) -> tuple[float, int]:
    """Wait until ``sql`` counts ``target``; return (wall time seen, count).

    Polls slowly (0.5 s) until the worker says its handlers ran ``expect`` times, then every
    5 ms, so that polling does not compete with the system for the 2 cores while it works.
    """
    while True:
        count = int(await connection.fetchval(sql))
        now = time.time()
        if count >= target:
            return now, count
        if worker.exited():
            code = worker.proc.returncode if worker.proc else None
            raise RuntimeError(f"worker {worker.label} exited (code {code}); {count}/{target} done")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count}/{target} done")
        if worker.done.is_set():
            await asyncio.sleep(0.005)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.done.wait(), 0.5)


# -- scenarios ----------------------------------------------------------------------------------


Sample = tuple[str, str, float | None, str, dict[str, Any]]  # scenario, metric, value, unit, extra


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[dict[str, Any]] = []
        if not args.append:
            args.out.write_text("")
        self.run_id = time.strftime("%Y%m%dT%H%M%S")

    def record(
        self, system: str, scenario: str, metric: str, value: float | None, unit: str, **extra: Any
    ) -> None:
        line = {
            "run": self.run_id,
            "system": system,
            "version": version(system),
            "scenario": scenario,
            "metric": metric,
            "value": None if value is None or math.isnan(value) else round(value, 3),
            "unit": unit,
            **extra,
        }
        self.results.append(line)
        text = json.dumps(line)
        print(text, flush=True)
        with self.args.out.open("a") as out:  # reopened per line: survives the file being replaced
            out.write(text + "\n")

    async def fresh(self, system: common.System) -> str:
        dsn = await common.recreate_database(self.args.dsn, system.database)
        await system.install(dsn)
        await system.open(dsn)
        return dsn

    async def timed_enqueue(
        self, system: common.System, label: str, body: Awaitable[None]
    ) -> float:
        """Await ``body`` (an enqueue); with --profile, under pyinstrument into <label>.txt."""
        profiler: Any = None
        if self.args.profile and system.name in self.args.profile_systems:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        started = time.perf_counter()
        await body
        seconds = time.perf_counter() - started
        if profiler is not None:
            profiler.stop()
            path = self.args.profile_dir / f"{label}.txt"
            path.write_text(profiler.output_text(unicode=True))
        return seconds

    async def worker_measure(
        self, system: common.System, dsn: str, mode: str, label: str, expect: int, target: int
    ) -> dict[str, Any]:
        """Start a worker on a prepared queue and measure READY -> all completed in the DB."""
        sql, _ = system.done_query(mode)
        worker = Worker(system.name, label, self.args)
        connection = await asyncpg.connect(dsn)
        try:
            await worker.start(dsn, mode, expect)
            ready = await asyncio.wait_for(worker.ready, 60)
            cpu0 = proc_cpu(worker.pid) or 0.0
            await worker.attach_profiler()
            deadline = time.monotonic() + self.args.timeout
            finished, count = await wait_completed(connection, sql, target, worker, deadline)
            worker_cpu = (proc_cpu(worker.pid) or 0.0) - cpu0
            db_cpu = await backends_cpu(connection, system.database)
            await worker.stop_profiler()
        finally:
            await worker.stop()
            await connection.close()
        elapsed = finished - ready
        return {
            "elapsed_s": round(elapsed, 3),
            "handlers_done_s": round(worker.done_ts - ready, 3) if worker.done_ts else None,
            "worker_cpu_s": round(worker_cpu, 2),
            "db_backends_cpu_s": round(db_cpu, 2),
            "completed": count,
            **({"worker": worker.stats} if self.args.trace and worker.stats else {}),
            **({"profile": str(worker.profile_path)} if worker.profile_path else {}),
        }

    async def scenario_a(self) -> None:
        """a for every system, their enqueues taking turns; record each system's median.

        An enqueue lasts a fraction of a second, so one sample is at the mercy of the machine's
        moment: each system is timed --enqueue-samples times per --repeat, each time into a
        fresh database, and the systems alternate so that they share the machine's moods.
        """
        n = self.args.n
        timings: dict[str, list[float]] = {name: [] for name in self.args.systems}
        failed: dict[str, str] = {}
        rounds = self.args.enqueue_samples * self.args.repeat
        for turn in range(rounds):
            for name in self.args.systems:
                if name in failed:
                    continue
                system = make_system(name)
                log(f"{name}: scenario a ({turn + 1}/{rounds}) ...")
                try:
                    await self.fresh(system)
                    try:
                        body = system.enqueue_noop(n)
                        timings[name].append(await self.timed_enqueue(system, f"{name}-a", body))
                    finally:
                        await system.close()
                except Exception as exc:  # noqa: BLE001 -- one failure must not stop the others
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    log(f"{name}: scenario a FAILED: {failed[name]}")
                    self.record(name, "a_", "error", None, "", error=failed[name])
        load = round(os.getloadavg()[0], 2)
        for name, seconds in timings.items():
            if name in failed or not seconds:
                continue
            median = statistics.median(seconds)
            self.record(
                name,
                "a_enqueue",
                "throughput",
                n / median,
                "jobs/s",
                n=n,
                elapsed_s=round(median, 3),
                samples_s=[round(t, 3) for t in seconds],
                loadavg_1m=load,
            )

    async def scenario_b(self, system: common.System) -> list[Sample]:
        n = self.args.n
        dsn = await self.fresh(system)
        try:
            enqueue_s = await self.timed_enqueue(
                system, f"{system.name}-b-enqueue", system.enqueue_noop(n)
            )
        finally:
            await system.close()
        m = await self.worker_measure(system, dsn, common.NOOP, f"{system.name}-b", n, n)
        return [
            (
                "b_drain",
                "throughput",
                n / m["elapsed_s"],
                "jobs/s",
                {
                    "n": n,
                    "concurrency": self.args.concurrency,
                    "enqueue_s": round(enqueue_s, 3),
                    **m,
                },
            )
        ]

    async def scenario_c(self, system: common.System) -> list[Sample]:
        count, interval = self.args.latency_count, self.args.latency_interval
        dsn = await self.fresh(system)
        worker = Worker(system.name, f"{system.name}-c", self.args)
        connection = await asyncpg.connect(dsn)
        create_s: list[float] = []
        try:
            await worker.start(dsn, common.LATENCY, count)
            await asyncio.wait_for(worker.ready, 60)
            await worker.attach_profiler()
            await asyncio.sleep(self.args.settle)  # let it connect, listen and go idle
            base = time.perf_counter()
            for i in range(count):
                delay = base + i * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                t0 = time.time()
                await system.enqueue_latency(t0)
                create_s.append(time.time() - t0)
            sql, per = system.done_query(common.LATENCY)
            deadline = time.monotonic() + self.args.timeout
            await wait_completed(connection, sql, count * per, worker, deadline)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.done.wait(), 5)
            await worker.stop_profiler()
        finally:
            await worker.stop()
            await connection.close()
            await system.close()
        lat = [x * 1000 for x in worker.latencies]
        extra = {
            "n": count,
            "interval_ms": interval * 1000,
            "samples": len(lat),
            "create_call_p50_ms": round(common.percentile(create_s, 50) * 1000, 3),
        }
        out: list[Sample] = [
            ("c_latency", f"p{p}", common.percentile(lat, p), "ms", extra) for p in (50, 95, 99)
        ]
        out.append(("c_latency", "max", max(lat) if lat else None, "ms", extra))
        return out

    async def scenario_d(self, system: common.System) -> list[Sample]:
        n = self.args.pipelines
        dsn = await self.fresh(system)
        try:
            enqueue_s = await self.timed_enqueue(
                system, f"{system.name}-d-enqueue", system.enqueue_pipelines(n)
            )
        finally:
            await system.close()
        _, per = system.done_query(common.PIPELINE)
        m = await self.worker_measure(system, dsn, common.PIPELINE, f"{system.name}-d", n, n * per)
        return [
            (
                "d_pipeline",
                "throughput",
                n / m["elapsed_s"],
                "pipelines/s",
                {
                    "n": n,
                    "stages": common.PIPELINE_STAGES,
                    "concurrency": self.args.concurrency,
                    "enqueue_s": round(enqueue_s, 3),
                    **m,
                },
            )
        ]

    async def guarded(
        self, name: str, scenario: str, body: Callable[[], Awaitable[list[Sample]]]
    ) -> None:
        """Run ``body`` --repeat times within the timeout; record the median of each metric."""
        runs: list[list[Sample]] = []
        for attempt in range(self.args.repeat):
            tag = f" (repeat {attempt + 1}/{self.args.repeat})" if self.args.repeat > 1 else ""
            log(f"{name}: scenario {scenario}{tag} ...")
            started = time.monotonic()
            load = round(os.getloadavg()[0], 2)  # other users of the machine show up here
            try:
                samples = await asyncio.wait_for(body(), self.args.timeout + 120)
                runs.append(
                    [(sc, m, v, u, {**x, "loadavg_1m": load}) for sc, m, v, u, x in samples]
                )
            except Exception as exc:  # noqa: BLE001 -- one failure must not stop the others
                kill_all()
                message = f"{type(exc).__name__}: {exc}"
                log(f"{name}: scenario {scenario} FAILED: {message}")
                for part in scenario:
                    self.record(name, f"{part}_", "error", None, "", error=message)
                return
            log(f"{name}: scenario {scenario} done in {time.monotonic() - started:.1f} s")
        for i, (scen, metric, _, unit, extra) in enumerate(runs[-1]):
            values = [r[i][2] for r in runs]
            clean = [v for v in values if v is not None and not math.isnan(v)]
            value = statistics.median(clean) if clean else None
            if len(runs) > 1:
                extra = {**extra, "repeats": [None if v is None else round(v, 3) for v in values]}
            self.record(name, scen, metric, value, unit, **extra)

    async def main(self) -> None:
        scenarios = set(self.args.scenarios)
        me = asyncio.current_task()
        assert me is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: workers down, databases gone
            loop.add_signal_handler(sig, me.cancel)
        try:
            if "a" in scenarios:
                await self.scenario_a()
            for group in ("b", "c", "d"):
                if group not in scenarios:
                    continue
                for name in self.args.systems:
                    system = make_system(name)
                    body: Callable[[], Awaitable[list[Sample]]]
                    if group == "b":
                        label, body = "b", functools.partial(self.scenario_b, system)
                    elif group == "c":
                        label, body = "c", functools.partial(self.scenario_c, system)
                    else:
                        label, body = "d", functools.partial(self.scenario_d, system)
                    await self.guarded(name, label, body)
        finally:
            kill_all()
            if not self.args.keep_databases:
                for name in self.args.systems:
                    with contextlib.suppress(Exception):
                        await common.drop_database(self.args.dsn, make_system(name).database)
        print(table(self.results, self.args.systems), flush=True)
        if self.args.profile == "py-spy":
            for path in sorted(self.args.profile_dir.glob("*.raw")):
                print(summarize_raw(path), flush=True)


# -- reporting ----------------------------------------------------------------------------------

ROWS = [
    ("a_enqueue", "throughput", "a bulk enqueue (jobs/s)", "higher"),
    ("b_drain", "throughput", "b drain, 1 worker x10 (jobs/s)", "higher"),
    ("c_latency", "p50", "c create->start p50 (ms)", "lower"),
    ("c_latency", "p95", "c create->start p95 (ms)", "lower"),
    ("c_latency", "p99", "c create->start p99 (ms)", "lower"),
    ("c_latency", "max", "c create->start max (ms)", "lower"),
    ("d_pipeline", "throughput", "d 3-stage pipelines (pipelines/s)", "higher"),
]


def table(results: list[dict[str, Any]], systems: list[str]) -> str:
    values = {(r["system"], r["scenario"], r["metric"]): r["value"] for r in results}
    errors = {(r["system"], r["scenario"][0]) for r in results if r["metric"] == "error"}
    peers = [s for s in systems if s != "kaiju"]
    headers = ["metric", *systems]
    if "kaiju" in systems and peers:
        headers.append("kaiju / best peer")
    rows = []
    for scenario, metric, label, better in ROWS:
        cells = [values.get((s, scenario, metric)) for s in systems]
        if all(c is None for c in cells) and not any((s, scenario[0]) in errors for s in systems):
            continue
        row = [label] + [
            _fmt(c, failed=(s, scenario[0]) in errors) for s, c in zip(systems, cells, strict=True)
        ]
        if "kaiju" in systems and peers:
            mine = values.get(("kaiju", scenario, metric))
            theirs = [v for p in peers if (v := values.get((p, scenario, metric))) is not None]
            best = (max if better == "higher" else min)(theirs) if theirs else None
            if mine is not None and best:
                row.append(f"{mine / best:.2f}x")
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line, " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += [
        " | ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    out.append(line)
    versions = ", ".join(f"{s} {version(s)}" for s in systems)
    out.append(f"({versions}; throughput ratio >1 = kaiju faster, latency ratio <1 = kaiju faster)")
    return "\n".join(out)


def _fmt(value: float | None, *, failed: bool = False) -> str:
    if value is None:
        return "FAILED" if failed else "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def summarize_raw(path: Path, top: int = 25) -> str:
    """Top functions (inclusive and self) of a py-spy raw (collapsed stacks) profile."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
    if not total:
        return f"{path}: no samples"
    lines = [f"\n== py-spy {path.name}: {total} samples (idle excluded) =="]
    lines.append("-- inclusive --")
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}%  {frame}")
    lines.append("-- self --")
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("BENCH_DSN", common.DEFAULT_DSN),
        help="admin DSN of the server (databases bench_* are created on it)",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--n", type=int, default=10_000, help="jobs for a and b")
    parser.add_argument("--pipelines", type=int, default=3_000, help="pipelines for d")
    parser.add_argument("--latency-count", type=int, default=200)
    parser.add_argument("--latency-interval", type=float, default=0.020, help="seconds")
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds the idle worker gets before c starts"
    )
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per scenario")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each scenario this many times; report the median"
    )
    parser.add_argument(
        "--enqueue-samples",
        type=int,
        default=5,
        help="a: enqueues timed per system and --repeat (each into a fresh database, the "
        "systems taking turns); the median is reported",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: n=1000, pipelines=300, 50 latency samples"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results.jsonl")
    parser.add_argument("--append", action="store_true", help="append to --out")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="kaiju worker: time store calls (claim, record_stages, ...)",
    )
    parser.add_argument(
        "--profile", choices=["py-spy", "pyinstrument"], help="profile the worker processes"
    )
    parser.add_argument("--profile-systems", default="kaiju")
    parser.add_argument("--profile-dir", type=Path, default=BENCH / "profiles")
    parser.add_argument("--keep-databases", action="store_true")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.profile_systems = [s.strip() for s in args.profile_systems.split(",")]
    for s in args.scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}")
    for s in args.systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}")
    if args.quick:
        args.n, args.pipelines, args.latency_count = 1000, 300, 50
        args.timeout = min(args.timeout, 120)
    if args.profile:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args)
    try:
        asyncio.run(run.main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        kill_all()
        log("interrupted")
        return 130
    finally:
        kill_all()
    return 1 if any(r["metric"] == "error" for r in run.results) else 0


if __name__ == "__main__":
    sys.exit(main())
