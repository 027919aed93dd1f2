"""deploy/prometheus and deploy/grafana: the alert rules, their unit tests and the dashboard.

promtool (Debian's `prometheus` package; `.ci/run` installs it) checks the rules and runs
their unit tests; these tests fail, rather than skip, where it is missing. Every metric
the rules and the dashboard name must exist on a running worker's /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Hub
from worker.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "hub-worker-rules.yml"
RULES_TEST = PROMETHEUS / "hub-worker-rules.test.yml"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "hub-worker.json"

_METRIC_RE = re.compile(r"\b(?:hub_worker|process|python)_[a-z0-9_]+\b")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, (
        "promtool is missing: `apt-get install -y prometheus` (Debian; .ci/run does it)"
    )
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> dict[str, str]:
    """Where -> PromQL, for every rule and every dashboard query."""
    found = {f"rule {r['alert']}": str(r["expr"]) for r in rules()}
    for panel in dashboard_panels():
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    return found


# -- promtool -----------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    # Relative to the test file, as its rule_files says.
    result = promtool("test", "rules", RULES_TEST.name, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_config() -> None:
    result = promtool("check", "config", "--syntax-only", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the rules ----------------------------------------------------------------------


def test_every_alert_has_a_severity_a_summary_a_description_and_a_unit_test() -> None:
    tested = RULES_TEST.read_text(encoding="utf-8")
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        assert f"alertname: {rule['alert']}\n" in tested, f"{rule['alert']} has no unit test"


def test_the_rules_cover_what_an_operator_is_paged_for() -> None:
    used = " ".join(str(r["expr"]) for r in rules())
    for what in (
        "hub_worker_lane_lag_seconds",  # lag
        "hub_worker_dead_letters_total",  # dead-letter rate
        "hub_worker_outbox_oldest_age_seconds",  # outbox age
        "hub_worker_lanes_owned",  # no lane owner
        'up{job="hub-worker"}',  # worker down
    ):
        assert what in used, what


# -- the dashboard ------------------------------------------------------------------


def test_the_dashboard_is_importable() -> None:
    board = dashboard()
    assert board["uid"] == "hub-worker"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"
    for panel in board["panels"]:
        position = panel["gridPos"]
        assert position["x"] >= 0, panel["title"]
        assert position["x"] + position["w"] <= 24, panel["title"]
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_expression_names_metrics() -> None:
    for where, expr in expressions().items():
        assert _METRIC_RE.search(expr) or 'up{job="hub-worker"}' in expr, where


# -- against a running worker -------------------------------------------------------


def exported(metrics_text: str) -> set[str]:
    """Every series name /metrics has or will have: a labelled counter without children
    yet shows only its family, so the family's type gives its series' names."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def get_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


@pytest.mark.integration
async def test_every_metric_the_rules_and_the_dashboard_use_is_exported(hub: Hub) -> None:
    port = free_port()
    await hub.start_worker(http_addr=f"127.0.0.1:{port}")
    await asyncio.sleep(2.5)  # one sampling period: the gauges with labels appear
    names = exported(await asyncio.to_thread(get_metrics, port))
    assert "hub_worker_build_info" in names
    assert "process_resident_memory_bytes" in names
    assert "python_gc_collections_total" in names
    missing = {
        f"{metric} ({where})"
        for where, expr in expressions().items()
        for metric in _METRIC_RE.findall(expr)
        if metric not in names
    }
    assert not missing, f"not on /metrics: {sorted(missing)}"
