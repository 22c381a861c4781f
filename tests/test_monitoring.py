"""Grafana and alerts (deploy/grafana, deploy/prometheus): promtool checks the rules and runs their unit
tests, and every metric and label the dashboard and the rules name exists in a real hub's and a real
agent's /metrics (so a renamed metric or label fails here, not in an operator's empty panel)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cloud_hub.tools.local_broker import LocalBroker, free_port
from edge_agent.drift import DRIFTING
from tests.helpers import agent_cmd, make_log, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS, GRAFANA = DEPLOY / "prometheus", DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "edgeml-fleet.json"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
MADE_BY_PROMETHEUS = {"up": TARGET_LABELS}  # a target's health, one series per target

# ------------------------------------------------------------------ what the files use


def rule_files() -> list[Path]:
    return sorted(p for p in PROMETHEUS.glob("*.yml") if p.name != "prometheus.yml" and not p.stem.endswith("_test"))


def alerts() -> list[dict]:
    return [rule for path in rule_files() for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def dashboard_targets() -> Iterator[tuple[str, dict]]:
    """(panel title, target) of every panel, rows' panels included."""
    def walk(panels: list[dict]) -> Iterator[dict]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for panel in walk(orjson.loads(DASHBOARD.read_bytes())["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target


def uses() -> list[tuple[str, str, set[str]]]:
    """(where, expression, labels its output is expected to carry) for every expression of the
    dashboard and the rules: legends' ``{{label}}`` and annotations' ``$labels.label``."""
    out = [(f"dashboard panel {title!r}", t["expr"], set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", ""))))
           for title, t in dashboard_targets()]
    for rule in alerts():
        text = " ".join(rule.get("annotations", {}).values())
        out.append((f"alert {rule['alert']}", rule["expr"], set(re.findall(r"\$labels\.(\w+)", text))))
    return out


SELECTOR = re.compile(r"\b(edgeml_\w+|up)\b\s*(\{[^}]*\})?")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def references(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The metrics an expression selects with the labels it matches on, and the labels it groups by."""
    metrics: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(expr):
        metrics.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    grouped = {label.strip() for labels in GROUPING.findall(expr) for label in labels.split(",") if label.strip()}
    return metrics, grouped


def missing(expositions: dict[str, set[str]]) -> list[str]:
    """What the dashboard and the rules name that no exposition has: one line per problem."""
    expositions = {**MADE_BY_PROMETHEUS, **expositions}
    problems = []
    for where, expr, output_labels in uses():
        metrics, grouped = references(expr)
        if not metrics:
            problems.append(f"{where}: no metric in {expr!r}")
        available = set(TARGET_LABELS)
        for name, labels in metrics.items():
            if name not in expositions:
                problems.append(f"{where}: metric {name} is in no /metrics")
                continue
            available |= expositions[name]
            problems += [f"{where}: {name} has no label {label!r}" for label in sorted(labels - expositions[name] -
                                                                                       TARGET_LABELS)]
        problems += [f"{where}: no metric of {expr!r} has the label {label!r}"
                     for label in sorted((grouped | output_labels) - available)]
    return problems


def exposition(port: int) -> dict[str, set[str]]:
    """Sample name -> the label names its samples carry, from a real /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


# ------------------------------------------------------------------ promtool


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:  # a missing tool must not pass CI quietly
        pytest.fail("promtool is missing: install Debian's 'prometheus' package (./dev test and .ci/run do)")
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_rules_and_the_scrape_example_pass_promtool_check() -> None:
    assert rule_files(), "no rules in deploy/prometheus"
    res = promtool("check", "rules", *(p.name for p in rule_files()))
    assert res.returncode == 0, res.stdout + res.stderr
    # syntax only: the token file it names is on the Prometheus host, not here
    res = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert sorted(config["rule_files"]) == [p.name for p in rule_files()]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    named = {j for rule in alerts() for j in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert named <= jobs, f"rules name jobs the scrape example does not have: {named - jobs}"


def test_every_alert_has_unit_tests_where_it_fires_and_where_it_stays_quiet() -> None:
    for rules in rule_files():
        tests_file = rules.with_name(f"{rules.stem}_test.yml")
        assert tests_file.exists(), f"{rules.name} has no unit tests ({tests_file.name})"
        spec = yaml.safe_load(tests_file.read_text())
        assert rules.name in spec["rule_files"]
        cases = [case for test in spec["tests"] for case in test.get("alert_rule_test", [])]
        names = {r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"] if "alert" in r}
        fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
        quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
        assert names - fires == set(), f"alerts never tested firing: {names - fires}"
        assert names - quiet == set(), f"alerts never tested staying quiet: {names - quiet}"
        assert {c["alertname"] for c in cases} <= names, "a test names an alert the rules do not have"
        res = promtool("test", "rules", tests_file.name)
        assert res.returncode == 0, res.stdout + res.stderr


def test_the_drift_threshold_is_the_one_the_hub_flags() -> None:
    rule = next(r for r in alerts() if r["alert"] == "DeviceDrifting")
    assert float(re.findall(r">\s*([0-9.]+)", rule["expr"])[0]) == DRIFTING
    panel = next(p for p in orjson.loads(DASHBOARD.read_bytes())["panels"] if p["title"] == "Drift per device (PSI)")
    assert DRIFTING in [step["value"] for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]


# ------------------------------------------------------------------ Grafana


def test_the_dashboard_and_its_provisioning_fit_together() -> None:
    dash = orjson.loads(DASHBOARD.read_bytes())
    (variable,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "edgeml.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and variable["current"]["value"] == source["uid"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "edgeml.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    targets = list(dashboard_targets())
    assert len(targets) >= 20
    for title, target in targets:  # every query goes to the chosen Prometheus
        assert target["datasource"] == {"type": "prometheus", "uid": f"${{{variable['name']}}}"}, title
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_the_compose_monitoring_profile_mounts_these_files() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    mounts = {svc: {v.split(":")[0]: v.split(":")[1] for v in services[svc]["volumes"] if v.startswith("./")}
              for svc in ("prometheus", "grafana")}
    for svc, by_source in mounts.items():
        assert services[svc]["profiles"] == ["monitoring"]
        for source in by_source:
            assert source.startswith("./secrets/") or (DEPLOY / source).exists(), f"{svc} mounts a missing {source}"
    prometheus = {Path(target).name: source for source, target in mounts["prometheus"].items()}
    assert {p.name for p in rule_files()} | {"prometheus.yml"} <= set(prometheus)
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "edgeml.yaml").read_text())["providers"]
    assert mounts["grafana"]["./grafana/dashboards"] == provider["options"]["path"]
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "edgeml.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    hub_job = next(j for j in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
                   if j["job_name"] == "edgeml-hub")
    port = services["hub"]["environment"]["CLOUD_HUB_HTTP"].rsplit(":", 1)[1]
    assert hub_job["static_configs"][0]["targets"] == [f"hub:{port}"]  # the service's name, its http port
    token = hub_job["authorization"]["credentials_file"]
    assert mounts["prometheus"]["./secrets/http.token"] == token
    assert services["hub"]["environment"]["CLOUD_HUB_HTTP_TOKEN_FILE"] in [
        v.split(":")[1] for v in services["hub"]["volumes"] if v.startswith("./secrets/http.token:")]


def test_the_reference_check_catches_a_renamed_metric_or_label() -> None:
    """The check the real scrape below relies on, on a hand-made exposition: it must see a rename."""
    names = {n: labels for _, expr, _ in uses() for n, labels in references(expr)[0].items()}
    full = {n: labels | {"le"} for n, labels in names.items()}
    full.update({n: set(labels) for n, labels in {
        "edgeml_devices": {"state"}, "edgeml_devices_by_model": {"model", "version", "state"},
        "edgeml_device_drift_psi": {"device"}, "edgeml_agent_drift_psi": {"device"},
        "edgeml_agent_model_version": {"model"}, "edgeml_canary_version": {"model"},
        "edgeml_rollouts_total": {"model", "outcome"}, "edgeml_rounds_total": {"model", "outcome"},
        "edgeml_rounds_open": {"model"}}.items()})
    for name in ("edgeml_hub_commit_seconds_bucket", "edgeml_agent_inference_seconds_bucket"):
        full[name] = {"le"}
    assert missing(full) == []
    renamed = {("edgeml_hub_results_stored" if n == "edgeml_hub_results_stored_total" else n): v for n, v in full.items()}
    assert any("edgeml_hub_results_stored_total is in no /metrics" in p for p in missing(renamed))
    relabelled = {**full, "edgeml_devices": {"status"}}
    assert any("edgeml_devices has no label 'state'" in p for p in missing(relabelled))


# ------------------------------------------------------------------ against a real hub and agent


@pytest.mark.slow
def test_every_metric_and_label_used_exists_on_a_real_hub_and_agent(procs, broker: LocalBroker, prefix: str,
                                                                    tmp_path: Path) -> None:
    from tests.helpers import make_bundle
    from tests.test_hub_cli import ServeProcess

    model = tmp_path / "v1.emlb"
    model.write_bytes(make_bundle(make_log(tmp_path / "train.csv", seconds=40)).encode())
    log = make_log(tmp_path / "live.csv", devices=("mon-1",), seconds=460)  # past MIN_WINDOWS windows: drift figures
    hub_port, agent_port = free_port(), free_port()
    hub = ServeProcess(procs, broker, f"sqlite:///{tmp_path / 'hub.sqlite'}", prefix, tmp_path / "serve.log",
                       env={"CLOUD_HUB_HTTP": f"127.0.0.1:{hub_port}"})
    hub.wait_started()
    with open(tmp_path / "agent.log", "wb") as err:
        agent = procs.popen(
            agent_cmd("run", "--broker", broker.url, "--prefix", prefix, "--device-id", "mon-1", "--model", str(model),
                      "--state-dir", str(tmp_path / "state"), "--source", "follow", "--source-path", str(log)),
            stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "EDGE_AGENT_METRICS_PORT": str(agent_port), "EDGE_AGENT_STATUS_INTERVAL_S": "1",
                 "EDGE_AGENT_BATCH_MAX_DELAY_S": "0.2"})

    def has(port: int, name: str, label: str) -> bool:
        assert agent.poll() is None and hub.proc.poll() is None, (tmp_path / "agent.log").read_text()
        try:
            return label in exposition(port).get(name, set())
        except OSError:
            return False

    # the labelled series exist once there is traffic: devices with a model, and drift figures
    wait_for(lambda: has(agent_port, "edgeml_agent_drift_psi", "device"), timeout=240, what="the agent's drift")
    wait_for(lambda: has(hub_port, "edgeml_device_drift_psi", "device")
             and has(hub_port, "edgeml_devices_by_model", "version"), timeout=120, what="the fleet on the hub")
    seen = exposition(hub_port)
    for name, labels in exposition(agent_port).items():
        seen.setdefault(name, set()).update(labels)
    assert missing(seen) == []
