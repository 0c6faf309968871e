"""Prometheus and Grafana configuration: promtool checks the scrape config and the alert rules, and runs each
alert's unit test; the Grafana provisioning and dashboards parse, and every query names only metrics that
afina's code registers (or the exporters beside it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from tests.unit.deploy.conftest import ROOT, run, tool

PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RULES = PROMETHEUS / "rules" / "afina.rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "afina.rules.test.yml"
# series that other programs export: Prometheus itself, and the redis exporter's per-key sizes (the queues)
FOREIGN_METRICS = {"up": "Prometheus", "redis_key_size": "oliver006/redis_exporter (docker-compose.yml, k8s/base)"}
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "label_replace", "label_join",
    "min_over_time", "max_over_time", "avg_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "clamp_min", "clamp_max", "abs", "absent", "vector", "scalar", "time", "changes", "resets", "sort", "sort_desc",
    "inf", "nan", "le",
}


def exported_metric_names() -> set[str]:
    """Every series name afina's code can expose: the metric families registered by afina.core.metrics and the
    gateway (imported here), with the suffixes Prometheus' exposition adds per type."""
    import afina.core.metrics  # noqa: F401
    import afina.gateway.app  # noqa: F401  (any metric a gateway module defines registers at import)

    names = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "gauge": [""], "summary": ["", "_sum", "_count", "_created"], "info": ["_info"]}
        for suffix in suffixes.get(family.type, [""]):
            names.add(family.name + suffix)
    return {name for name in names if name.startswith("afina_")}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label names
    in matchers or grouping clauses, durations or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()
        if word in PROMQL_WORDS or following.startswith("("):
            continue
        names.add(word)
    return names


def dashboards() -> list[Path]:
    return sorted((GRAFANA / "dashboards").glob("*.json"))


def dashboard_queries(path: Path) -> list[str]:
    board = json.loads(path.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_scrape_config_and_its_rule_files() -> None:
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    result = run([tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_its_unit_test() -> None:
    result = run([tool("promtool"), "test", "rules", str(RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tested for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    required = {"AfinaQueueStuck", "AfinaJobFailureRateHigh", "AfinaGatewayErrorRateHigh"}
    assert required <= fired, required - fired


def test_the_rule_unit_tests_catch_a_rule_that_does_not_fire(tmp_path: Path) -> None:
    """A broken rule (threshold never reached) makes ``promtool test rules`` fail: the tests are real."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    broken = RULES.read_text().replace("/ sum(rate(afina_http_requests_total[5m]))) > 0.05",
                                       "/ sum(rate(afina_http_requests_total[5m]))) > 0.5")
    assert broken != RULES.read_text()
    (tmp_path / "rules" / "afina.rules.yml").write_text(broken)
    (tmp_path / "tests" / "afina.rules.test.yml").write_text(RULE_TESTS.read_text())
    result = run([tool("promtool"), "test", "rules", str(tmp_path / "tests" / "afina.rules.test.yml")])
    assert result.returncode != 0 and "AfinaGatewayErrorRateHigh" in result.stdout + result.stderr


def test_every_alert_is_explained_in_the_runbook() -> None:
    runbook = (ROOT / "deploy" / "README.md").read_text()
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in runbook, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_the_kubernetes_scrape_conventions_match_the_scaled_objects_queries() -> None:
    """The runbook's Kubernetes scrape config maps pod labels to series labels, which KEDA's queries use."""
    runbook = (ROOT / "deploy" / "README.md").read_text()
    assert "__meta_kubernetes_pod_label_(.+)" in runbook and "labelmap" in runbook


def test_grafana_provisions_the_prometheus_datasource_the_dashboards_name() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "afina.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert len(dashboards()) >= 2
    uids = set()
    for path in dashboards():
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == uid, (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])


def test_the_dashboards_show_what_operators_asked_for() -> None:
    queries = " ".join(query for path in dashboards() for query in dashboard_queries(path))
    for metric in ("afina_jobs_finished_total", "redis_key_size", "afina_train_step_seconds_bucket",
                   "afina_train_tokens_per_second", "afina_gpu_memory_bytes", "afina_inference_request_seconds_bucket",
                   "afina_inference_time_to_first_token_seconds_bucket", "afina_http_requests_total"):
        assert metric in queries, metric


def test_dashboards_and_alerts_name_only_metrics_the_code_exports() -> None:
    exported = exported_metric_names()
    assert {"afina_jobs_finished_total", "afina_train_step_seconds_bucket", "afina_job_phase"} <= exported
    queries = [(path.name, query) for path in dashboards() for query in dashboard_queries(path)]
    queries += [(RULES.name, rule["expr"]) for rule in alert_rules()]
    unknown = {(where, name) for where, query in queries for name in metric_names_in(query)
               if name not in exported and name not in FOREIGN_METRICS}
    assert not unknown, sorted(unknown)


def test_the_metric_name_extraction_sees_through_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(afina_x_bucket{model=~"a|b"}[5m]))) '
            '/ on(model) group_left max_over_time(label_replace(afina_y, "p", "$1", "k", "(.*)")[10m:1m]) '
            'unless bogus_metric')
    assert metric_names_in(expr) == {"afina_x_bucket", "afina_y", "bogus_metric"}


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression (Grafana only shows a broken one as an error)."""
    rules = [{"record": f"dashboard:query_{index}", "expr": query}
             for index, query in enumerate(q for path in dashboards() for q in dashboard_queries(path))]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run([tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_metric_is_defined_outside_the_modules_this_test_imports() -> None:
    """exported_metric_names imports afina.core.metrics and the gateway; a metric defined in a worker's module
    would escape the dashboards' check."""
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info)\(\s*[\"']")
    allowed = {ROOT / "shared/afina/core/metrics.py"}
    offenders = []
    for folder in ("shared", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            if path in allowed or "gateway" in path.parts or "tests" in path.parts:
                continue
            if pattern.search(path.read_text(errors="replace")):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


@pytest.mark.parametrize("job", ["gateway", "ingest", "trainer", "exporter", "evaluator", "redis"])
def test_the_compose_prometheus_scrapes_every_service(job: str) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert job in {scrape["job_name"] for scrape in config["scrape_configs"]}
