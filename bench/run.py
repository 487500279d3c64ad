"""Benchmark kaiju-tasks against pgqueuer and procrastinate on one local PostgreSQL.

    python bench/run.py                      # a-f, 3 rounds each (~15 minutes on 2 cores)
    python bench/run.py --big                # and g, the 100,000-task drain
    python bench/run.py --quick              # smoke run, scaled down, one round
    python bench/run.py --scenarios b,d --systems kaiju,pgqueuer --profile py-spy

Scenarios (each system, same server, its own freshly created database per run):
  a  bulk enqueue N no-op jobs with the system's bulk API (5 samples, the
     systems taking turns)                                                    -> jobs/s
  b  drain those N jobs with one worker process, concurrency 10               -> jobs/s
  c  create->first-stage-start latency, idle worker, 200 jobs 20 ms apart     -> p50/p95/p99 ms
  d  drain 3,000 3-stage pipelines (kaiju: templates; peers: enqueue next job from the handler)
                                                                              -> pipelines/s
  e  as b, each stage a JSON-RPC call over HTTP to bench/service.py           -> jobs/s
  f  as d, each stage a JSON-RPC call over HTTP to bench/service.py           -> pipelines/s
  g  as b with 100,000 jobs (--big): does the rate hold as the table grows?   -> jobs/s

Every scenario runs --repeat times (3; 1 with --quick), the systems taking turns within each
round; the median and the range are reported. The ratio is kaiju's median over the best median
among the peers' configurations (pgqueuer capped at 10 in flight, pgqueuer with its defaults,
procrastinate), with the range of that ratio round by round.

Results: one JSON line per (system, scenario, metric) on stdout and in bench/results.jsonl,
then a table. Progress and diagnostics go to stderr; worker logs to bench/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from bench import common  # noqa: E402

BENCH = ROOT / "bench"
SYSTEMS = ("kaiju", "pgqueuer", "pgqueuer-defaults", "procrastinate")
VARIANTS = ("kaiju-batch", "kaiju-otel")
"""kaiju configurations run on demand (--systems): remote stage calls batched 50 at a time,
and every span recorded with the OpenTelemetry SDK. Not peers: never in the best-peer ratio."""
SCENARIOS = ("a", "b", "c", "d", "e", "f", "g")
DEFAULT_SCENARIOS = "a,b,c,d,e,f"  # g with --big
PACKAGES = {
    "kaiju": "kaiju-tasks",
    "kaiju-batch": "kaiju-tasks",
    "kaiju-otel": "kaiju-tasks",
    "pgqueuer": "pgqueuer",
    "pgqueuer-defaults": "pgqueuer",
    "procrastinate": "procrastinate",
}
# Scenario a times the producer only, which is the same code for both pgqueuer rows.
ENQUEUE_SYSTEMS = ("kaiju", "pgqueuer", "procrastinate")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_system(name: str) -> common.System:
    if name.startswith("kaiju"):
        from bench.kaiju import Kaiju

        kaiju = Kaiju()
        kaiju.name = name  # a variant's worker is told which (bench/worker.py)
        return kaiju
    if name in ("pgqueuer", "pgqueuer-defaults"):
        from bench.peers.pgqueuer_peer import PgQueuerPeer

        return PgQueuerPeer(defaults=name == "pgqueuer-defaults")
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

    async def start(self, dsn: str, mode: str, expect: int, service_url: str | None = None) -> None:
        command = [sys.executable, "-m", "bench.worker", self.system, "--dsn", dsn]
        command += ["--mode", mode, "--expect", str(expect)]
        command += ["--concurrency", str(self.args.concurrency)]
        if service_url:
            command += ["--service-url", service_url]
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


class Service:
    """The JSON-RPC service of the remote scenarios (bench/service.py), its own process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.done = asyncio.Event()
        self.done_ts: float | None = None
        self._ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        command = [sys.executable, "-m", "bench.service", "--port", "0"]
        command += ["--delay-ms", str(self.args.service_delay_ms)]
        (BENCH / "logs").mkdir(exist_ok=True)
        stderr = (BENCH / "logs" / "service.log").open("wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *command,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            stderr.close()
        LIVE.add(self.proc)
        self._reader = asyncio.create_task(self._read())
        port = await asyncio.wait_for(self._ready, 30)
        self.url = f"http://127.0.0.1:{port}/"
        self._session = aiohttp.ClientSession()
        log(f"service: {self.url} (pid {self.proc.pid})")

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            kind, _, rest = raw.decode().strip().partition(" ")
            if kind == "READY" and not self._ready.done():
                self._ready.set_result(int(rest))
            elif kind == "DONE":
                self.done_ts = float(rest)
                self.done.set()
        if not self._ready.done():
            self._ready.set_exception(RuntimeError("the service exited before READY"))
        self.done.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def arm(self, expect: int) -> None:
        """Reset the service's counters; it reports DONE after ``expect`` final calls."""
        if not self.alive():
            raise RuntimeError("the service is not running")
        assert self._session is not None
        self.done.clear()
        self.done_ts = None
        async with self._session.post(self.url + "control", json={"expect": expect}) as reply:
            reply.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.get(self.url + "stats") as reply:
            return dict(await reply.json())

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                _kill(self.proc)
                await self.proc.wait()
        LIVE.discard(self.proc)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


async def wait_completed(
    connection: asyncpg.Connection,
    sql: str,
    target: int,
    worker: Worker,
    deadline: float,
    handlers_done: asyncio.Event | None = None,
) -> tuple[float, int]:
    """Wait until ``sql`` counts ``target``; return (wall time seen, count).

    Polls slowly (0.5 s) until the handlers ran ``expect`` times (``handlers_done``: the
    worker's DONE, or the service's in the remote scenarios), then every 5 ms, so that polling
    does not compete with the system for the 2 cores while it works.
    """
    handlers_done = handlers_done or worker.done
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
        if handlers_done.is_set() or worker.done.is_set():
            await asyncio.sleep(0.005)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handlers_done.wait(), 0.5)


# -- scenarios ----------------------------------------------------------------------------------


Sample = tuple[str, str, float | None, str, dict[str, Any]]  # scenario, metric, value, unit, extra

# Worker scenarios: (mode, metric name, unit, what n is).
DRAINS: dict[str, tuple[str, str, str, str]] = {
    "b": (common.NOOP, "b_drain", "jobs/s", "n"),
    "d": (common.PIPELINE, "d_pipeline", "pipelines/s", "pipelines"),
    "e": (common.REMOTE, "e_remote_drain", "jobs/s", "n"),
    "f": (common.REMOTE_PIPELINE, "f_remote_pipeline", "pipelines/s", "pipelines"),
    "g": (common.NOOP, "g_drain_big", "jobs/s", "big_n"),
}
REMOTE_SCENARIOS = ("e", "f")


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[dict[str, Any]] = []
        if not args.append:
            args.out.write_text("")
        self.run_id = time.strftime("%Y%m%dT%H%M%S")
        self.service: Service | None = None
        self.profiles: list[Path] = []

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
        self,
        system: common.System,
        dsn: str,
        mode: str,
        label: str,
        expect: int,
        target: int,
        limit_s: float,
    ) -> dict[str, Any]:
        """Start a worker on a prepared queue and measure READY -> all completed in the DB."""
        sql, _ = system.done_query(mode)
        worker = Worker(system.name, label, self.args)
        service = self.service if mode in (common.REMOTE, common.REMOTE_PIPELINE) else None
        connection = await asyncpg.connect(dsn)
        service_cpu0 = 0.0
        try:
            if service is not None:
                await service.arm(expect)  # DONE after `expect` final calls
                service_cpu0 = proc_cpu(service.pid) or 0.0
            await worker.start(dsn, mode, expect, service.url if service else None)
            ready = await asyncio.wait_for(worker.ready, 60)
            cpu0 = proc_cpu(worker.pid) or 0.0
            await worker.attach_profiler()
            deadline = time.monotonic() + limit_s
            finished, count = await wait_completed(
                connection, sql, target, worker, deadline, service.done if service else None
            )
            worker_cpu = (proc_cpu(worker.pid) or 0.0) - cpu0
            service_cpu = (proc_cpu(service.pid) or 0.0) - service_cpu0 if service else None
            db_cpu = await backends_cpu(connection, system.database)
            service_stats = await service.stats() if service is not None else None
            await worker.stop_profiler()
        finally:
            await worker.stop()
            await connection.close()
        elapsed = finished - ready
        done_ts = service.done_ts if service is not None else worker.done_ts
        if worker.profile_path:
            self.profiles.append(worker.profile_path)
        return {
            "elapsed_s": round(elapsed, 3),
            "handlers_done_s": round(done_ts - ready, 3) if done_ts else None,
            "worker_cpu_s": round(worker_cpu, 2),
            "db_backends_cpu_s": round(db_cpu, 2),
            **({"service_cpu_s": round(service_cpu, 2)} if service_cpu is not None else {}),
            **({"service": service_stats} if service_stats else {}),
            "completed": count,
            **({"worker": worker.stats} if self.args.trace and worker.stats else {}),
            **({"profile": str(worker.profile_path)} if worker.profile_path else {}),
        }

    async def scenario_a(self) -> None:
        """a for every system, their enqueues taking turns; record each system's median.

        An enqueue lasts a fraction of a second, so one sample is at the mercy of the machine's
        moment: each system is timed max(--enqueue-samples, --repeat) times, each time into a
        fresh database, and the systems alternate so that they share the machine's moods.
        """
        n = self.args.n
        names = [s for s in self.args.systems if s in ENQUEUE_SYSTEMS]
        timings: dict[str, list[float]] = {name: [] for name in names}
        failed: dict[str, str] = {}
        rounds = max(self.args.enqueue_samples, self.args.repeat)
        for turn in range(rounds):
            for name in names:
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
            rates = [n / t for t in seconds]
            self.record(
                name,
                "a_enqueue",
                "throughput",
                statistics.median(rates),
                "jobs/s",
                n=n,
                elapsed_s=round(statistics.median(seconds), 3),
                samples_s=[round(t, 3) for t in seconds],
                repeats=[round(r, 3) for r in rates],
                min=round(min(rates), 3),
                max=round(max(rates), 3),
                loadavg_1m=load,
            )

    async def scenario_drain(
        self, system: common.System, scenario: str, label: str
    ) -> list[Sample]:
        """b, d, e, f, g: enqueue, then measure one worker draining the queue."""
        mode, metric_scenario, unit, size = DRAINS[scenario]
        n = getattr(self.args, size)
        timeout = self.args.big_timeout if scenario == "g" else self.args.timeout
        dsn = await self.fresh(system)
        try:
            enqueue = (
                system.enqueue_pipelines(n) if common.is_pipeline(mode) else system.enqueue_noop(n)
            )
            enqueue_s = await self.timed_enqueue(system, f"{label}-enqueue", enqueue)
        finally:
            await system.close()
        _, per = system.done_query(mode)
        m = await self.worker_measure(system, dsn, mode, label, n, n * per, timeout)
        extra: dict[str, Any] = {"n": n, "concurrency": self.args.concurrency}
        if common.is_pipeline(mode):
            extra["stages"] = common.PIPELINE_STAGES
        if scenario in REMOTE_SCENARIOS:
            extra["service_delay_ms"] = self.args.service_delay_ms
        extra["enqueue_s"] = round(enqueue_s, 3)
        return [(metric_scenario, "throughput", n / m["elapsed_s"], unit, {**extra, **m})]

    async def scenario_c(self, system: common.System, label: str) -> list[Sample]:
        count, interval = self.args.latency_count, self.args.latency_interval
        dsn = await self.fresh(system)
        worker = Worker(system.name, label, self.args)
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
        if worker.profile_path:
            self.profiles.append(worker.profile_path)
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

    def systems_for(self, scenario: str) -> list[str]:
        if scenario == "g":
            return [s for s in self.args.systems if s in self.args.big_systems]
        return list(self.args.systems)

    async def once(self, name: str, scenario: str, label: str) -> list[Sample]:
        system = make_system(name)
        if scenario == "c":
            return await self.scenario_c(system, label)
        return await self.scenario_drain(system, scenario, label)

    async def interleaved(self, scenario: str) -> None:
        """Run ``scenario`` --repeat rounds, every system once per round, taking turns.

        The order rotates from round to round, so that no system always follows the same one.
        A system that fails is recorded as an error and left out of the remaining rounds. Each
        metric is recorded as the median of the rounds, with the rounds' values and range.
        """
        names = self.systems_for(scenario)
        rounds = self.args.repeat
        runs: dict[str, list[list[Sample]]] = {name: [] for name in names}
        loads: list[float] = []
        failed: set[str] = set()
        timeout = self.args.big_timeout if scenario == "g" else self.args.timeout
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)] if names else []
            for name in order:
                if name in failed:
                    continue
                tag = f" (round {r + 1}/{rounds})" if rounds > 1 else ""
                label = f"{name}-{scenario}" + (f"-{r + 1}" if rounds > 1 else "")
                log(f"{name}: scenario {scenario}{tag} ...")
                started = time.monotonic()
                loads.append(os.getloadavg()[0])  # other users of the machine show up here
                try:
                    samples = await asyncio.wait_for(
                        self.once(name, scenario, label), timeout + 120
                    )
                except Exception as exc:  # noqa: BLE001 -- one failure must not stop the others
                    kill_all_workers(self.service)
                    message = f"{type(exc).__name__}: {exc}"
                    log(f"{name}: scenario {scenario} FAILED: {message}")
                    failed.add(name)
                    self.record(name, f"{scenario}_", "error", None, "", error=message)
                    continue
                runs[name].append(samples)
                value = samples[0][2]
                shown = f"{value:,.2f} {samples[0][3]}" if value is not None else "-"
                log(
                    f"{name}: scenario {scenario} done in {time.monotonic() - started:.1f} s"
                    f" ({samples[0][1]} {shown})"
                )
        load = round(statistics.median(loads), 2) if loads else None
        for name in names:
            if name in failed or not runs[name]:
                continue
            samples_by_round = runs[name]
            for i, (scen, metric, _, unit, extra) in enumerate(samples_by_round[-1]):
                values = [run[i][2] for run in samples_by_round]
                clean = [v for v in values if v is not None and not math.isnan(v)]
                value = statistics.median(clean) if clean else None
                more: dict[str, Any] = {"loadavg_1m_median": load}
                if len(samples_by_round) > 1:
                    more["repeats"] = [None if v is None else round(v, 3) for v in values]
                    if clean:
                        more["min"] = round(min(clean), 3)
                        more["max"] = round(max(clean), 3)
                    more["rounds"] = [run[i][4] for run in samples_by_round]
                    extra = {k: v for k, v in extra.items() if k in ("n", "stages", "concurrency")}
                self.record(name, scen, metric, value, unit, **extra, **more)

    async def main(self) -> None:
        scenarios = set(self.args.scenarios)
        me = asyncio.current_task()
        assert me is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: workers down, databases gone
            loop.add_signal_handler(sig, me.cancel)
        log(
            f"run {self.run_id}: scenarios {','.join(self.args.scenarios)}, systems "
            f"{','.join(self.args.systems)}, {self.args.repeat} round(s), "
            f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )
        try:
            if scenarios & set(REMOTE_SCENARIOS):
                self.service = Service(self.args)
                await self.service.start()
            if "a" in scenarios:
                await self.scenario_a()
            for scenario in ("b", "c", "d", "e", "f", "g"):
                if scenario in scenarios:
                    await self.interleaved(scenario)
        finally:
            kill_all_workers(self.service)
            if self.service is not None:
                await self.service.stop()
            kill_all()
            if not self.args.keep_databases:
                for name in self.args.systems:
                    with contextlib.suppress(Exception):
                        await common.drop_database(self.args.dsn, make_system(name).database)
        print(table(self.results, self.args.systems), flush=True)
        if self.args.profile == "py-spy":
            for path in self.profiles:
                if path.suffix == ".raw" and path.exists():
                    print(summarize_raw(path), flush=True)


def kill_all_workers(service: Service | None) -> None:
    """Kill every process started, except the service (it serves the next scenarios)."""
    keep = service.proc if service is not None else None
    for proc in list(LIVE):
        if proc is keep:
            continue
        if proc.returncode is None:
            _kill(proc)
        LIVE.discard(proc)


# -- reporting ----------------------------------------------------------------------------------

ROWS = [
    ("a_enqueue", "throughput", "a bulk enqueue (jobs/s)", "higher"),
    ("b_drain", "throughput", "b drain, 1 worker x10 (jobs/s)", "higher"),
    ("c_latency", "p50", "c create->start p50 (ms)", "lower"),
    ("c_latency", "p95", "c create->start p95 (ms)", "lower"),
    ("c_latency", "p99", "c create->start p99 (ms)", "lower"),
    ("c_latency", "max", "c create->start max (ms)", "lower"),
    ("d_pipeline", "throughput", "d 3-stage pipelines (pipelines/s)", "higher"),
    ("e_remote_drain", "throughput", "e drain over HTTP x10 (jobs/s)", "higher"),
    ("f_remote_pipeline", "throughput", "f pipelines over HTTP (pipelines/s)", "higher"),
    ("g_drain_big", "throughput", "g drain of {big_n} (jobs/s)", "higher"),
]


def table(results: list[dict[str, Any]], systems: list[str]) -> str:
    """Median (range) per system; kaiju's median over the best peer's, with the per-round range.

    The best peer is the peer configuration with the best median. The range of the ratio is
    kaiju's value over that peer's value round by round (the rounds interleave the systems, so
    the two values of a round saw the same moment of the machine).
    """
    found = {(r["system"], r["scenario"], r["metric"]): r for r in results if r["metric"]}
    values = {key: r["value"] for key, r in found.items()}
    errors = {(r["system"], r["scenario"][0]) for r in results if r["metric"] == "error"}
    peers = [s for s in systems if not s.startswith("kaiju")]
    compare = "kaiju" in systems and bool(peers)
    headers = ["metric", *systems]
    if compare:
        headers += ["kaiju / best peer", "best peer"]
    big_n = next((r.get("n") for r in results if r["scenario"] == "g_drain_big"), None)
    rows = []
    for scenario, metric, label, better in ROWS:
        cells = [found.get((s, scenario, metric)) for s in systems]
        if all(c is None for c in cells) and not any((s, scenario[0]) in errors for s in systems):
            continue
        label = label.format(big_n=f"{big_n:,}" if big_n else "100,000")
        row = [label] + [
            _cell(c, failed=(s, scenario[0]) in errors) for s, c in zip(systems, cells, strict=True)
        ]
        if compare:
            row += _ratio(found, peers, scenario, metric, better)
        rows.append(row)
        if scenario == "g_drain_big":  # does the rate hold? g over b, per system
            held = [
                _held(values.get((s, "g_drain_big", metric)), values.get((s, "b_drain", metric)))
                for s in systems
            ]
            if any(h != "-" for h in held):
                rows.append(["g rate / b rate (same run)", *held, *(["", ""] if compare else [])])
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line, " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    left = {0, len(headers) - 1} if compare else {0}  # labels and peer names
    out += [
        " | ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    out.append(line)
    versions = ", ".join(
        f"{s} {version(s)}" for s in systems if s not in ("pgqueuer-defaults", *VARIANTS)
    )
    out.append(
        f"({versions}; median (min-max) of the rounds; throughput ratio >1 = kaiju faster, "
        "latency ratio <1 = kaiju faster)"
    )
    return "\n".join(out)


def _ratio(
    found: dict[tuple[str, str, str], dict[str, Any]],
    peers: list[str],
    scenario: str,
    metric: str,
    better: str,
) -> list[str]:
    mine = found.get(("kaiju", scenario, metric))
    theirs = [
        (r["value"], p)
        for p in peers
        if (r := found.get((p, scenario, metric))) is not None and r["value"] is not None
    ]
    if mine is None or mine["value"] is None or not theirs:
        return ["-", "-"]
    best_value, best = (max if better == "higher" else min)(theirs)
    if not best_value:
        return ["-", best]
    text = f"{mine['value'] / best_value:.2f}x"
    mine_rounds = mine.get("repeats") or []
    their_rounds = found[(best, scenario, metric)].get("repeats") or []
    per_round = [
        a / b for a, b in zip(mine_rounds, their_rounds, strict=False) if a is not None and b
    ]
    if len(per_round) > 1:
        text += f" ({min(per_round):.2f}-{max(per_round):.2f})"
    return [text, best]


def _held(big: float | None, small: float | None) -> str:
    return f"{big / small:.2f}" if big is not None and small else "-"


def _cell(record: dict[str, Any] | None, *, failed: bool = False) -> str:
    if record is None or record["value"] is None:
        return "FAILED" if failed else "-"
    text = _fmt(record["value"])
    if "min" in record and "max" in record:
        text += f" ({_fmt(record['min'])}-{_fmt(record['max'])})"
    return text


def _fmt(value: float) -> str:
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
    parser.add_argument(
        "--scenarios", default=DEFAULT_SCENARIOS, help=f"of {','.join(SCENARIOS)} (g: --big)"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--n", type=int, default=10_000, help="jobs for a, b and e")
    parser.add_argument("--pipelines", type=int, default=3_000, help="pipelines for d and f")
    parser.add_argument(
        "--big", action="store_true", help="add scenario g: a drain of --big-n jobs"
    )
    parser.add_argument("--big-n", type=int, default=100_000, help="jobs for g")
    parser.add_argument(
        "--big-systems",
        default="kaiju,pgqueuer,pgqueuer-defaults",
        help="systems of g (procrastinate drains ~200/s: 100,000 jobs would take ~8 minutes)",
    )
    parser.add_argument("--big-timeout", type=float, default=1200, help="seconds per g run")
    parser.add_argument("--latency-count", type=int, default=200)
    parser.add_argument("--latency-interval", type=float, default=0.020, help="seconds")
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds the idle worker gets before c starts"
    )
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument(
        "--service-delay-ms",
        type=float,
        default=0.0,
        help="e, f: the service waits this long before answering each request",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per scenario run")
    parser.add_argument(
        "--repeat",
        type=int,
        help="rounds of each scenario, the systems taking turns; the median and range are "
        "reported (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--enqueue-samples",
        type=int,
        default=5,
        help="a: enqueues timed per system (at least --repeat; each into a fresh database, the "
        "systems taking turns); the median is reported",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one round, n=1000, pipelines=300, 50 latency samples, 2 enqueue "
        "samples (g: 10,000)",
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
    if args.big and "g" not in args.scenarios:
        args.scenarios.append("g")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.big_systems = [s.strip() for s in args.big_systems.split(",") if s.strip()]
    args.profile_systems = [s.strip() for s in args.profile_systems.split(",")]
    for s in args.scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}")
    for s in [*args.systems, *args.big_systems]:
        if s not in (*SYSTEMS, *VARIANTS):
            parser.error(f"unknown system {s!r}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat is at least 1")
    if args.quick:
        args.n, args.pipelines, args.latency_count = 1000, 300, 50
        args.big_n = min(args.big_n, 10_000)
        args.enqueue_samples = min(args.enqueue_samples, 2)
        args.timeout = min(args.timeout, 120)
        args.big_timeout = min(args.big_timeout, 300)
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
