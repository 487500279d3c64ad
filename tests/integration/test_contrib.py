"""contrib/: the Grafana dashboard and the Prometheus alert rules, against a live /metrics scrape.

Every metric a panel or a rule queries must be a series of a real scrape taken after a small
workload (tasks that succeed, retry, fail, and wait for an app nobody serves), with the type its
suffix implies. The rules are checked with ``promtool check rules`` when it is installed, and
by their structure always; the dashboard's queries go through promtool too, as recording rules.
With ``KAIJU_TASKS_REQUIRE_PROMTOOL=1`` (CI) a missing promtool fails those tests instead of
skipping them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kaiju_tasks import Task, TaskCommand, config, methods
from kaiju_tasks.cli import _api
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import MethodError
from kaiju_tasks.metrics import Metrics
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "kaiju-tasks.json"
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\bkaiju_tasks_[a-z_]+")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# Grafana's variables, as a Prometheus query sees them once Grafana has substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$app": ".*"}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def _dashboard_exprs() -> list[str]:
    exprs = [
        target["expr"]
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def _alert_exprs() -> list[str]:
    return [rule["expr"] for rule in _rules()]


def _families(text: str) -> dict[str, tuple[str, set[str]]]:
    """Family name -> (type, names of the samples it has in the scrape)."""
    return {
        family.name: (family.type, {sample.name for sample in family.samples})
        for family in text_string_to_metric_families(text)
    }


def _resolve(name: str, families: dict[str, tuple[str, set[str]]]) -> tuple[str, str]:
    """The (family, type) a queried series name belongs to, by the suffix its type gives it.

    A gauge is queried by its family name; a counter as ``<family>_total``; a histogram as
    ``<family>_bucket``, ``_sum`` or ``_count`` (never by its family name alone).
    """
    if name in families and families[name][0] == "gauge":
        return name, "gauge"
    if name.endswith("_total") and families.get(name.removesuffix("_total"), ("",))[0] == (
        "counter"
    ):
        return name.removesuffix("_total"), "counter"
    for suffix in HISTOGRAM_SERIES:
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and families.get(base, ("",))[0] == "histogram":
            return base, "histogram"
    raise AssertionError(f"{name} is no gauge, counter or histogram series of /metrics")


def test_resolve_follows_the_suffix_of_each_type() -> None:
    families = {
        "kaiju_tasks_g": ("gauge", {"kaiju_tasks_g"}),
        "kaiju_tasks_c": ("counter", {"kaiju_tasks_c_total"}),
        "kaiju_tasks_h": ("histogram", {"kaiju_tasks_h_bucket", "kaiju_tasks_h_count"}),
    }
    assert _resolve("kaiju_tasks_g", families) == ("kaiju_tasks_g", "gauge")
    assert _resolve("kaiju_tasks_c_total", families) == ("kaiju_tasks_c", "counter")
    assert _resolve("kaiju_tasks_h_bucket", families) == ("kaiju_tasks_h", "histogram")
    assert _resolve("kaiju_tasks_h_count", families) == ("kaiju_tasks_h", "histogram")
    for wrong in ("kaiju_tasks_c", "kaiju_tasks_h", "kaiju_tasks_g_total", "kaiju_tasks_x"):
        with pytest.raises(AssertionError):
            _resolve(wrong, families)
    assert METRIC.findall('rate(kaiju_tasks_h_bucket{app="kaiju_tasks"}[5m])') == [
        "kaiju_tasks_h_bucket"
    ]


def test_each_alert_rule_has_what_an_alert_needs() -> None:
    rules = _rules()
    assert rules
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str)
        assert METRIC.search(rule["expr"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"], rule["alert"]
    assert {"KaijuTasksQueueLagHigh", "KaijuTasksAppUnserved", "KaijuTasksFailureRatioHigh"} <= (
        set(names)
    )


REQUIRE_PROMTOOL = "KAIJU_TASKS_REQUIRE_PROMTOOL"
"""Set to 1 (CI) to fail, not skip, the promtool checks when promtool is not installed."""


def _promtool(rules: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        why = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get(REQUIRE_PROMTOOL) == "1":
            pytest.fail(f"{why}, and {REQUIRE_PROMTOOL}=1 requires it")
        pytest.skip(why)
    return subprocess.run(
        [promtool, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_alert_rules_pass_promtool() -> None:
    checked = _promtool(ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query, as a recording rule once Grafana's variables are set."""
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        if expr.startswith("label_values("):  # a Grafana function, not PromQL
            expr = METRIC.findall(expr)[0]
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"kaiju_tasks:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = _promtool(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "kaiju-tasks"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    source = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["app"]["datasource"] == source
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["title"]
        assert panel["type"] in {"stat", "timeseries", "gauge", "table", "bargauge"}
        assert panel["datasource"] == source, panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), panel["title"]
            assert target["datasource"] == source


def _workload_methods() -> methods.Methods:
    registry = methods.Methods()
    attempts: dict[str, int] = {}

    @registry.register("shop.ok")
    async def ok(n: int = 0) -> int:
        await asyncio.sleep(0.01)
        return n

    @registry.register("shop.flaky")
    def flaky(key: str) -> str:
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] < 2:
            raise MethodError("not yet")
        return "done"

    @registry.register("shop.boom")
    def boom() -> None:
        raise MethodError("boom")

    return registry


@dataclass
class Live:
    """The API after the workload: its client, its store and the first full scrape."""

    client: Any
    store: postgres.PostgresEngineStore
    dsn: str
    text: str

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """GET /metrics now: sample value by (name, sorted labels)."""
        response = await self.client.get("/metrics")
        assert response.status == 200
        return _samples(await response.text())


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
async def live(
    store: postgres.PostgresEngineStore, dsn: str, aiohttp_client: Any
) -> AsyncIterator[Live]:
    """GET /metrics after tasks of app shop ran (one failing, one retried).

    The API is built as ``kaiju-tasks server`` builds it, metrics and the refused-token counter
    included; a task of app ``nobody`` stays QUEUED, unserved.
    """
    metrics = Metrics(store, dsn)
    await metrics.start()
    api = _api(store, methods.Methods(), config.Settings(), metrics)
    client = await aiohttp_client(rpc_server.create_app(api))
    try:
        async with asyncio.timeout(30):  # the receiver follows events from where it is placed
            await metrics._receiver.ready.wait()
        service = TaskService(store)
        async with Executor(store, apps=["shop"], methods=_workload_methods(), dsn=dsn):
            tasks = [
                Task(
                    app="shop",
                    commands=[
                        TaskCommand(method="shop.ok", params={"n": i}),
                        TaskCommand(method="shop.ok"),
                    ],
                )
                for i in range(3)
            ]
            tasks.append(
                Task(
                    app="shop",
                    max_retries=2,
                    commands=[TaskCommand(method="shop.flaky", params={"key": "a"})],
                )
            )
            tasks.append(Task(app="shop", commands=[TaskCommand(method="shop.boom")]))
            created = await service.create(tasks, columns=["id"])
            assert isinstance(created, list)
            ids = [row["id"] for row in created]
            await service.create(Task(app="nobody", commands=[TaskCommand(method="x")]))
            refused = await client.post(
                "/public/rpc",
                data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tasks.list"}),
                headers={"Authorization": "Bearer kt_wrong"},
            )
            assert refused.status == 200

            async def ended() -> bool:
                page = await service.list(
                    conditions={"id": ids, "status": ["FINISHED", "FAILED"]}, limit=1
                )
                return bool(page["count"] == len(ids))

            await eventually(ended, what="the shop tasks end")

            async def scraped() -> str | None:
                response = await client.get("/metrics")
                assert response.status == 200
                text = await response.text()
                counts = [
                    sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "kaiju_tasks_stage_duration_seconds_count"
                ]
                # 3 x 2 stages, a retry and its success, a failure
                return text if sum(counts) >= 9 else None

            text: str = await eventually(scraped, what="every stage end in the histogram")
        yield Live(client, store, dsn, text)
    finally:
        await metrics.stop()


@pytest.fixture
def scrape(live: Live) -> str:
    """The text of GET /metrics after the workload (see :func:`live`)."""
    return live.text


async def test_every_metric_queried_is_in_a_live_scrape(scrape: str) -> None:
    families = _families(scrape)
    queried = {
        name for expr in _dashboard_exprs() + _alert_exprs() for name in METRIC.findall(expr)
    }
    assert queried
    missing = []
    for name in sorted(queried):
        family, _ = _resolve(name, families)
        if name not in families[family][1]:  # the family is declared but has no such sample
            missing.append(name)
    assert not missing, f"queried but absent from the scrape: {missing}"
    # What the issue asks the dashboard and the rules to show, by the metric that shows it.
    for needed in (
        "kaiju_tasks_tasks",  # queue depth, tasks by status
        "kaiju_tasks_tasks_ended_total",  # throughput, failed share, failure ratio
        "kaiju_tasks_queue_lag_seconds",
        "kaiju_tasks_stage_duration_seconds_bucket",
        "kaiju_tasks_executors_alive",
        "kaiju_tasks_unserved_tasks",
        "kaiju_tasks_events_written_total",
        "kaiju_tasks_auth_refused_total",
    ):
        assert needed in queried, needed
    assert {"kaiju_tasks_unserved_tasks", "kaiju_tasks_queue_lag_seconds"} <= {
        name for expr in _alert_exprs() for name in METRIC.findall(expr)
    }


async def test_the_workload_shows_in_the_series_the_dashboard_reads(scrape: str) -> None:
    samples = _samples(scrape)
    assert samples[("kaiju_tasks_tasks", (("app", "shop"), ("status", "FINISHED")))] == 4
    assert samples[("kaiju_tasks_tasks", (("app", "shop"), ("status", "FAILED")))] == 1
    assert samples[("kaiju_tasks_unserved_tasks", (("app", "nobody"),))] == 1
    assert ("kaiju_tasks_queue_lag_seconds", (("app", "nobody"),)) in samples
    assert samples[("kaiju_tasks_executors_alive", ())] >= 1
    assert samples[("kaiju_tasks_auth_refused_total", (("reason", "invalid"),))] == 1
    count = "kaiju_tasks_stage_duration_seconds_count"
    assert samples[(count, (("method", "shop.boom"),))] == 1
    assert samples[(count, (("method", "shop.flaky"),))] == 2


ENDED = "kaiju_tasks_tasks_ended_total"


def _ended(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], status: str) -> float:
    return samples.get((ENDED, (("app", "shop"), ("status", status))), 0.0)


def test_throughput_and_failure_ratio_read_the_ended_counter() -> None:
    """Not the row-count gauge, which garbage collection and cron re-queues move."""
    panels = {p["title"]: p for p in _panels(_dashboard()["panels"])}
    for title in ("Tasks ended / s", "Failed share by app (15m)"):
        exprs = [t["expr"] for t in panels[title]["targets"]]
        assert all(ENDED in e and "kaiju_tasks_tasks{" not in e for e in exprs), title
    ratio = next(r for r in _rules() if r["alert"] == "KaijuTasksFailureRatioHigh")
    assert set(METRIC.findall(ratio["expr"])) == {ENDED}
    for expr in _dashboard_exprs() + _alert_exprs():
        assert not re.search(r"(deriv|delta|rate|increase)\(kaiju_tasks_tasks\{", expr), expr


async def test_the_ended_counter_counts_the_workload_and_stays_after_gc(live: Live) -> None:
    first = _samples(live.text)
    assert _ended(first, "FINISHED") == 4  # 3 tasks, and the retried one once (its retry is no end)
    assert _ended(first, "FAILED") == 1
    assert (ENDED, (("app", "nobody"), ("status", "FINISHED"))) not in first  # still QUEUED

    # Garbage collection deletes the ended tasks and every event: the gauge drops, the counter not.
    later = datetime(2999, 1, 1, tzinfo=UTC)
    assert await live.store.prune("tasks", before=later, limit=1000) == 5
    assert await live.store.prune("events", before=later, limit=10_000) > 0
    collected = await live.scrape()
    assert ("kaiju_tasks_tasks", (("app", "shop"), ("status", "FINISHED"))) not in collected
    assert _ended(collected, "FINISHED") == 4
    assert _ended(collected, "FAILED") == 1

    # Runs ended since are added to what was counted.
    service = TaskService(live.store)
    async with Executor(live.store, apps=["shop"], methods=_workload_methods(), dsn=live.dsn):
        await service.create(
            [
                Task(app="shop", commands=[TaskCommand(method="shop.ok")]),
                Task(app="shop", commands=[TaskCommand(method="shop.boom")]),
            ]
        )

        async def counted() -> dict[Any, float] | None:
            samples = await live.scrape()
            ended = (_ended(samples, "FINISHED"), _ended(samples, "FAILED"))
            assert ended[0] <= 5, ended  # never counted twice
            assert ended[1] <= 2, ended
            return samples if ended[0] == 5 and ended[1] == 2 else None

        await eventually(counted, what="the new runs counted")
