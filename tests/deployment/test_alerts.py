"""The alerting rules shipped with the platform (prometheus/alerts.yml): valid, each with a
unit test that makes it fire, loaded by both Prometheus configurations, and about metrics the
platform exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import ROOT

PROMETHEUS = ROOT / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"
# Where the metrics the rules read are defined.
METRIC_SOURCES = ["shared/metrics.py", "campaign_service/metrics.py", "worker/metrics.py"]
SAMPLE_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
# Series Prometheus makes itself, for every target it scrapes.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "bool", "offset"} | {
    # Aggregations, which may be followed by ``by (…)`` rather than their parenthesis.
    *("sum", "min", "max", "avg", "group", "count", "stddev", "stdvar", "topk", "bottomk"),
    *("quantile", "count_values", "limitk", "limit_ratio"),
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: scripts/test installs Debian's prometheus package"
    return subprocess.run([tool, *args], capture_output=True, text=True, cwd=ROOT)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, strings and functions left
    out)."""
    bare = re.sub(r"\{[^}]*\}|\"[^\"]*\"|\[[^\]]*\]", " ", expr)
    names = set(re.findall(r"\b[a-z_][a-z0-9_]*\b(?!\s*\()", bare))
    grouped = set(re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", bare))
    labels = {label.strip() for group in grouped for label in group.split(",")}
    return names - PROMQL_WORDS - labels


class TestAlertingRules:
    def test_promtool_checks_them(self) -> None:
        checked = promtool("check", "rules", str(RULES))

        assert checked.returncode == 0, checked.stdout + checked.stderr

    def test_their_unit_tests_pass(self) -> None:
        tested = promtool("test", "rules", str(RULE_TESTS))

        assert tested.returncode == 0, tested.stdout + tested.stderr

    def test_every_alert_fires_in_a_unit_test(self) -> None:
        firing = {
            case["alertname"]
            for test in load(RULE_TESTS)["tests"]
            for case in test.get("alert_rule_test", [])
            if case.get("exp_alerts")
        }

        assert {rule["alert"] for rule in alerts()} <= firing

    def test_the_operators_alerts_are_there(self) -> None:
        assert {rule["alert"] for rule in alerts()} >= {
            "DeadLettersArriving",
            "OutboxLagGrowing",
            "WorkerNotConsuming",
            "HttpServerErrors",
        }

    def test_every_alert_has_a_severity_and_a_description(self) -> None:
        for rule in alerts():
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]

    @pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
    def test_they_read_metrics_the_platform_exports(self, rule: dict[str, Any]) -> None:
        sources = "".join((ROOT / path).read_text() for path in METRIC_SOURCES)
        names = metric_names(rule["expr"])

        assert names
        for name in names - PROMETHEUS_SERIES:
            base = next((name[: -len(s)] for s in SAMPLE_SUFFIXES if name.endswith(s)), name)
            assert f'"{base}"' in sources, f"{rule['alert']} reads {name}, which nothing exports"


class TestPrometheusLoadsThem:
    @pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.local.yml"])
    def test_each_configuration_names_the_rules(self, config: str) -> None:
        checked = promtool("check", "config", str(PROMETHEUS / config))

        assert load(PROMETHEUS / config)["rule_files"] == ["alerts.yml"]
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "SUCCESS: 1 rule files found" in checked.stdout

    def test_compose_mounts_them_beside_its_configuration(self) -> None:
        prometheus = load(ROOT / "docker-compose.yml")["services"]["prometheus"]

        assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
        assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus["volumes"]
