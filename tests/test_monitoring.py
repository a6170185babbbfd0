"""The monitoring files in contrib/: the Prometheus rules pass promtool's
check and their own unit tests, the Grafana dashboard is a well-formed JSON
model, and every metric either of them queries is one that a real relayd
exposes on /metrics (so a renamed or misspelled metric fails here, not on
an operator's silent dashboard)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from admin_client import http_get
from helpers_tools import tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "relayd-rules.yml"
RULES_TEST = ROOT / "contrib" / "prometheus" / "relayd-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "relayd.json"

METRIC = re.compile(r"\brelayd_[a-z_]+")
RECORDED = re.compile(r"\brelayd:[a-zA-Z0-9_:]+")


def promtool(*args: str) -> None:
    path = tool("promtool", "prometheus")
    done = subprocess.run([path, *args], capture_output=True, text=True, timeout=60,
                          cwd=RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules():
    promtool("check", "rules", str(RULES))


def test_promtool_unit_tests():
    promtool("test", "rules", str(RULES_TEST))


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(model: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in model["panels"] for t in p.get("targets", []) if "expr" in t]
    for var in model.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return exprs


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition has or can have: the sample names,
    plus what each `# TYPE` line implies (a counter's `_total`, a
    histogram's `_bucket/_sum/_count`, a gauge with no sample yet, like
    relayd_upstream_errors before any upstream exists)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "counter":
                base = name.removesuffix("_total")
                names.update({base + "_total", base + "_created"})
            elif kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count",
                              name + "_created"})
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def referenced(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def unknown(exprs: list[str], exposed: set[str]) -> set[str]:
    return referenced(exprs) - exposed


async def test_queried_metrics_exist(relay):
    status, body = await http_get(relay.metrics_port, "/metrics")
    assert status == 200
    exposed = exposed_names(body.decode())
    # the parser itself: exposition names resolve, a misspelling does not
    assert {"relayd_messages_total", "relayd_delivery_duration_seconds_bucket",
            "relayd_upstream_errors", "relayd_sessions_active"} <= exposed
    assert unknown(["rate(relayd_message_total[5m])"], exposed) == {"relayd_message_total"}
    assert unknown(["rate(relayd_messages[5m])"], exposed) == {"relayd_messages"}

    rule_exprs = [rule["expr"] for rule in rules()]
    dash_exprs = dashboard_exprs(dashboard())
    assert referenced(rule_exprs) and referenced(dash_exprs)
    assert unknown(rule_exprs, exposed) == set(), "rules query metrics relayd lacks"
    assert unknown(dash_exprs, exposed) == set(), "dashboard queries metrics relayd lacks"


def test_recording_rules_used_are_defined():
    all_rules = rules()
    recorded = {rule["record"] for rule in all_rules if "record" in rule}
    assert recorded and all(name.startswith("relayd:") for name in recorded)
    used = {name for rule in all_rules for name in RECORDED.findall(rule["expr"])}
    assert used <= recorded


def test_dashboard_model():
    model = dashboard()
    assert model["title"] and model["panels"]
    uses_input = any(i.get("name") == "DS_PROMETHEUS" for i in model.get("__inputs", []))
    assert uses_input
    for panel in model["panels"]:
        assert panel.get("targets"), f"panel {panel.get('title')!r} has no target"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"empty query in {panel['title']!r}"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"


@pytest.mark.parametrize("title", [
    "Messages by result", "Recipients by result", "Delivery duration", "Sessions active",
    "Upstream errors", "Auth attempts", "Limit rejections", "Lockouts", "Config reloads"])
def test_dashboard_has_panel(title):
    assert title in {p["title"] for p in dashboard()["panels"]}
