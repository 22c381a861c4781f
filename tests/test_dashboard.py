"""The live dashboard of `cloud-hub serve --http`, in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium): it shows the devices of a live run and updates without a reload, behind
the hub's token (basic auth, as a person types it into the browser's prompt)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from cloud_hub.data import db, sessions
from cloud_hub.data.store import ResultRow
from cloud_hub.tools.local_broker import LocalBroker, free_port
from tests.helpers import agent_cmd, fleet_files, make_log, wait_for
from tests.test_hub_cli import ServeProcess, count_rows
from tests.test_store import BACKENDS, backend_engine

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TOKEN = "dashboard-token-0123456789"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium; quit (browser and driver) on failure too."""
    if CHROMIUM is None or DRIVER is None:
        pytest.fail("the dashboard test needs Debian's chromium and chromium-driver: "
                    "apt-get install -y chromium chromium-driver (./dev setup and .ci/run do it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _get(port: int, path: str) -> urllib.request.Request:
    return urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"})


def _api(port: int) -> dict:
    with urllib.request.urlopen(_get(port, "/api/fleet"), timeout=5) as resp:
        return orjson.loads(resp.read())


def _answers(port: int) -> bool:
    try:
        _api(port)
    except OSError:
        return False
    return True


def _a_round(url: str) -> None:
    from cloud_hub.rounds.store import RoundStore

    engine = db.make_engine(url)
    store = RoundStore()
    with sessions.transaction(engine) as conn:
        store.add_round(conn, round_id=1, name="default", base_version=1, participants=["dev-a", "dev-b"],
                        plan={"task": "classification"}, announcement=b"x", opened_at=time.time(),
                        deadline=time.time() + 60)
        for device, status, reason in (("dev-a", "accepted", None), ("dev-b", "accepted", None),
                                       ("dev-c", "refused", "dev-c was not selected for round 1")):
            store.add_update(conn, round_id=1, update_round=1, device_id=device, status=status, reason=reason,
                             n_examples=10, staleness=0, size=1024 if status == "accepted" else 100,
                             sha256=device, metrics=None, payload=None, at=time.time())
        store.set_round(conn, 1, state="published", expect=("open",), new_version=2, outcome={
            "federated": {"metric_before": 0.6, "metric_after": 0.8}, "holdout_before": 0.7, "holdout_after": 0.75})
        # a secure round: the hub saw only the sum of three devices' deltas
        store.add_round(conn, round_id=2, name="default", base_version=2, participants=["dev-a", "dev-b", "dev-c"],
                        plan={"task": "classification", "secure": {"threshold": 2},
                              "dp": {"mode": "distributed", "noise": 1.2, "delta": 1e-5}}, announcement=b"x",
                        opened_at=time.time(), deadline=time.time() + 60)
        store.set_round(conn, 2, state="published", expect=("open",), new_version=3, outcome={
            "secure": True, "summed": 3, "federated": {"metric_before": 0.7, "metric_after": 0.9},
            "privacy": {"epsilon": 1.234, "epsilon_total": 2.5, "rho": 0.1}})
    engine.dispose()


def _a_canary(url: str) -> None:
    from cloud_hub.data.store import Store

    engine = db.make_engine(url)
    with sessions.transaction(engine) as conn:
        Store(engine).add_rollout(conn, name="default", version=2, previous=1, cohort=["dev-a"], min_results=50,
                                  tolerance=0.02, at=time.time())
    engine.dispose()


@pytest.mark.slow
def test_the_dashboard_shows_a_live_run_and_updates_without_a_reload(procs, browser, broker: LocalBroker,
                                                                     prefix: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    log, model, keys = fleet_files(tmp_path)
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    port = free_port()
    (tmp_path / "http.token").write_text(TOKEN + "\n")
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "serve.log", env={
        "CLOUD_HUB_HTTP": f"127.0.0.1:{port}", "CLOUD_HUB_HTTP_TOKEN_FILE": str(tmp_path / "http.token")})
    hub.wait_started()
    wait_for(lambda: _answers(port), what="the dashboard's API")

    def replay(path: Path, state: str) -> None:
        agent = procs.popen(agent_cmd("replay", str(path), "--broker", broker.url, "--model", str(model), "--prefix",
                                      prefix, "--state-dir", str(tmp_path / state), "--speed", "0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert agent.wait(120) == 0, agent.stderr.read() if agent.stderr else ""

    replay(log, "a1")
    browser.get(f"http://hub:{TOKEN}@127.0.0.1:{port}/")  # type: ignore[attr-defined]  # the prompt's answer
    wait = WebDriverWait(browser, 60)

    def rows() -> dict[str, list[str]]:
        """The table as the page shows it now (read in one script: the page redraws it every 2 s)."""
        cells = browser.execute_script(  # type: ignore[attr-defined]
            "return Array.from(document.querySelectorAll('#devices tbody tr'))"
            ".map(tr => Array.from(tr.cells).map(td => td.textContent))")
        return {row[0]: row for row in cells}

    wait.until(lambda _: set(rows()) >= {"dev-a", "dev-b", "dev-c"})
    per_device = {d: sum(1 for dd, _ in keys if dd == d) for d in ("dev-a", "dev-b", "dev-c")}
    wait.until(lambda _: all(rows()[d][6] == str(n) for d, n in per_device.items()))
    shown = rows()
    assert all(shown[d][2] == "v1" for d in per_device), shown  # the model version each reported
    assert all(shown[d][5].endswith("%") for d in per_device), shown  # accuracy over the last hour
    first_page = browser.execute_script("return performance.timeOrigin")  # type: ignore[attr-defined]

    # A new device replays: the same page (no reload) shows it, and the plots have data
    replay(make_log(tmp_path / "late.csv", devices=("dev-late",), seconds=20, seed=3, start_ts=5000.0), "a2")
    wait.until(lambda _: "dev-late" in rows() and int(rows()["dev-late"][6]) > 0)
    assert browser.execute_script("return performance.timeOrigin") == first_page, "the page was reloaded"  # type: ignore[attr-defined]
    total = count_rows(url)
    wait.until(lambda _: f"{total} results" in browser.find_element(By.ID, "status").text)  # type: ignore[attr-defined]
    assert browser.find_elements(By.CSS_SELECTOR, "#rate circle")  # type: ignore[attr-defined]
    assert "0 refused messages" in browser.find_element(By.ID, "dead").text  # type: ignore[attr-defined]
    assert "no federated round yet" in browser.find_element(By.ID, "rounds").text  # type: ignore[attr-defined]
    _a_round(url)  # as `cloud-hub federate` records one: the page shows it at its next poll
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#rounds tr[data-round='1']"))  # type: ignore[attr-defined]
    cells = browser.execute_script(  # type: ignore[attr-defined]
        "return Array.from(document.querySelectorAll('#rounds tr[data-round] td')).map(td => td.textContent)")
    assert cells[:8] == ["1", "v1", "published v2", "2 / 0 / 1", "2 kB", "60.0% → 80.0%", "70.0% → 75.0%", "-"], cells
    assert cells[8:] == ["2", "v2", "published v3", "secure: 3 in the sum", "0 kB", "70.0% → 90.0%", "- → -",
                         "distributed 1.23 / 2.50 (δ 0.00001)"], cells
    _a_canary(url)  # as `cloud-hub publish --canary` records one: its verdict so far, and serve has no key
    wait.until(lambda _: "to decide:" in browser.find_element(By.ID, "verdict").text)  # type: ignore[attr-defined]
    verdict = browser.find_element(By.ID, "verdict").text  # type: ignore[attr-defined]
    assert "open canary: wait" in verdict and "0 of 50 cohort results so far" in verdict, verdict
    assert "cannot be promoted by this hub: it has no signing key" in verdict, verdict
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))  # type: ignore[attr-defined]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    api = _api(port)
    assert api["results"] == total and {d["device_id"] for d in api["devices"]} == {*per_device, "dev-late"}
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(_get(port, "/nope"), timeout=5)
    with pytest.raises(urllib.error.HTTPError, match="401"):  # the page's data, without the token
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/fleet", timeout=5)


def _say_drift(broker: LocalBroker, prefix: str, device: str, psi: float, confidence: float) -> None:
    """A status as the agent publishes it once it has measured its drift (from 400 windows on: more than a
    test replays), through the broker to serve."""
    from edge_agent import contract as c
    from edge_agent.mqtt import BrokerURL, MqttLink

    link = MqttLink(BrokerURL.parse(broker.url), f"{prefix}-drift")
    link.start()
    try:
        link.wait_connected(10)
        link.publish(c.Topics(prefix).status(device), c.Status(device, c.ONLINE, time.time(), "default", 1,
                                                               drift_psi=psi, mean_confidence=confidence).encode(),
                     c.STATUS_DELIVERY)
    finally:
        link.stop(timeout=30)  # after its PUBACK


@pytest.mark.slow
def test_a_device_page_shows_the_versions_it_ran_its_classes_and_its_drift(procs, browser, broker: LocalBroker,
                                                                            prefix: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.helpers import make_bundle

    fleet_log, v1, _ = fleet_files(tmp_path)
    v2 = tmp_path / "v2.emlb"
    v2.write_bytes(make_bundle(fleet_log, version=2).encode())
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    port = free_port()
    (tmp_path / "http.token").write_text(TOKEN + "\n")
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "serve.log", env={
        "CLOUD_HUB_HTTP": f"127.0.0.1:{port}", "CLOUD_HUB_HTTP_TOKEN_FILE": str(tmp_path / "http.token")})
    hub.wait_started()
    wait_for(lambda: _answers(port), what="the dashboard's API")
    # dev-a runs v1, then v2 (a canary, say), then v1 again (rolled back): three runs, in that order
    for i, model in enumerate((v1, v2, v1)):
        log = make_log(tmp_path / f"a{i}.csv", devices=("dev-a",), seconds=15, seed=i, start_ts=10_000.0 * i)
        agent = procs.popen(agent_cmd("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix",
                                      prefix, "--state-dir", str(tmp_path / "state"), "--speed", "0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert agent.wait(120) == 0, agent.stderr.read() if agent.stderr else ""
    total = count_rows(url)
    wait_for(lambda: sum(d["results"] for d in _api(port)["devices"]) == total, timeout=60, what="every result stored")
    _say_drift(broker, prefix, "dev-a", 0.41, 0.62)
    wait_for(lambda: next(d for d in _api(port)["devices"] if d["device_id"] == "dev-a")["drift_psi"] == 0.41,
             timeout=60, what="the drift status stored")

    browser.get(f"http://hub:{TOKEN}@127.0.0.1:{port}/")  # type: ignore[attr-defined]
    wait = WebDriverWait(browser, 60)
    clock = browser.find_element(By.ID, "clock").text  # type: ignore[attr-defined]
    assert "hub's clock" in clock and "received_at" in clock, clock  # which clock the per-minute plots count
    wait.until(lambda _: browser.execute_script(  # type: ignore[attr-defined]  # found and clicked in one go: the
        "const a = document.querySelector(\"#devices a[href='/devices/dev-a']\"); if (a) a.click(); return !!a"))  # table is redrawn every 2 s
    wait.until(lambda _: browser.find_elements(By.ID, "versions"))  # type: ignore[attr-defined]
    assert browser.find_element(By.TAG_NAME, "h1").text == "device dev-a"  # type: ignore[attr-defined]

    def cells(css: str) -> list[list[str]]:
        return browser.execute_script(  # type: ignore[attr-defined, no-any-return]
            f"return Array.from(document.querySelectorAll({css!r})).map(tr => Array.from(tr.cells).map(td => td.textContent))")

    api = _device_api(port, "dev-a")
    runs = cells("#versions tbody tr")
    assert [r[0] for r in runs] == ["v1", "v2", "v1"], runs
    assert [int(r[1]) for r in runs] == [r["results"] for r in api["runs"]] and sum(int(r[1]) for r in runs) == total
    assert all(r[4].startswith("1970-01-01") for r in runs), runs  # the windows' times: the logs' own clock
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline rect")) == 3  # type: ignore[attr-defined]
    classes = cells("#classes tr")
    assert {r[0]: int(r[2]) for r in classes} == api["classes"] and sum(api["classes"].values()) == total, classes
    assert len(classes) >= 2, classes  # the sample log's activities
    drift = browser.find_element(By.ID, "drift").text  # type: ignore[attr-defined]
    assert "0.41 drifting" in drift and "mean confidence 0.62" in drift, drift
    browser.find_element(By.LINK_TEXT, "← the fleet").click()  # type: ignore[attr-defined]
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr"))  # type: ignore[attr-defined]

    # hostile and unknown ids: a 404 that names them, escaped (no markup of theirs on the page)
    browser.get(f"http://127.0.0.1:{port}/devices/%3Cscript%3Ealert(1)%3C%2Fscript%3E")  # type: ignore[attr-defined]
    body = browser.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    assert "'<script>alert(1)</script>' is not a device id" in body, body
    assert not browser.find_elements(By.TAG_NAME, "script")  # type: ignore[attr-defined]
    for path, status, needle in (("/devices/dev-zz", 404, b"no device &#x27;dev-zz&#x27; on this hub"),
                                 ("/devices/%3Cb%3Ex", 404, b"&#x27;&lt;b&gt;x&#x27; is not a device id"),
                                 ("/api/devices/dev-zz", 404, b'"error":"no device \'dev-zz\' on this hub'),
                                 ("/devices/", 404, b"is not a device id"),
                                 ("/devices/dev-a", 200, b"<h1>device dev-a</h1>")):
        code, reply = _open(port, path)
        assert code == status and needle in reply, (path, code, reply[-400:])
    with pytest.raises(urllib.error.HTTPError, match="401"):  # the device page, without the token
        urllib.request.urlopen(f"http://127.0.0.1:{port}/devices/dev-a", timeout=5)
    assert "Traceback" not in hub.log.read_text()


def _device_api(port: int, device: str) -> dict:
    with urllib.request.urlopen(_get(port, f"/api/devices/{device}"), timeout=5) as resp:
        return orjson.loads(resp.read())


def _open(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` with the token: its status and body, a 404's too."""
    try:
        with urllib.request.urlopen(_get(port, path), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_devices_history_splits_its_versions_into_runs_and_counts_its_classes_and_values(
        backend: str, tmp_path: Path) -> None:
    """The queries behind the device page, on SQLite and PostgreSQL: v1, v2, v1 again (a rollback) are three
    runs in seq order, whatever the hub's arrival order; a regressor gets a histogram per output."""
    from cloud_hub.data.device_history import device_history
    from cloud_hub.data.store import Store
    from cloud_hub.web.device_page import render
    from edge_agent import contract as c

    def result(device: str, seq: int, version: int, *, label: str | None = None, value: str | None = None,
               truth: str | None = None, at: float = 1_000.0) -> ResultRow:
        return ResultRow(device, seq, seq / 1000, seq / 1000 + 2, version, label, 0.5 + version / 10, value, truth,
                         1.0, None, at)

    versions = [1] * 4 + [2] * 3 + [1] * 5
    rows = [result("dev-a", 1000 * i, v, label="run" if i % 3 else "walk", truth="run", at=2_000.0 - i)
            for i, v in enumerate(versions)]  # stored in the reverse order: runs follow seq, not arrival
    rows += [result("r1", 1000 * i, 1, value=orjson.dumps([float(i), 5.0, 7.0 * i]).decode()) for i in range(11)]
    rows += [result("r1", 99_000, 1, value="[1.0]"), result("r1", 98_000, 1, value="not json")]  # ignored
    with backend_engine(backend, tmp_path) as engine:
        store = Store(engine)
        with sessions.transaction(engine) as conn:
            store.insert_results(conn, rows)
            store.apply_statuses(conn, {"dev-s": (c.Status("dev-s", c.ONLINE, 50.0, drift_psi=0.1), 60.0)})
        with sessions.transaction(engine, write=False) as conn:
            a, r1, s = (device_history(conn, d) for d in ("dev-a", "r1", "dev-s"))
            assert device_history(conn, "dev-zz") is None
    assert a is not None and r1 is not None and s is not None
    assert [(run["version"], run["results"], run["seq"]) for run in a["runs"]] == [
        (1, 4, [0, 3000]), (2, 3, [4000, 6000]), (1, 5, [7000, 11000])]
    assert a["runs"][0]["received"] == [1997.0, 2000.0] and a["runs"][0]["start"] == [0.0, 3.0]
    assert [run["accuracy"] for run in a["runs"]] == [0.5, 2 / 3, 0.8]
    assert a["runs"][1]["mean_confidence"] == pytest.approx(0.7)
    assert a["classes"] == {"run": 8, "walk": 4} and a["by_version"] == {1: {"run": 6, "walk": 3}, 2: {"run": 2, "walk": 1}}
    assert a["status"] is None and a["drift"]["psi"] is None and a["values"] is None
    values = r1["values"]
    assert values["results"] == 11 and values["width"] == 3 and [o["output"] for o in values["outputs"]] == [0, 1, 2]
    assert all(sum(o["counts"]) == 11 for o in values["outputs"]), values
    assert values["outputs"][2]["edges"][0] == 0.0 and values["outputs"][2]["edges"][-1] == 70.0
    assert values["outputs"][0]["counts"] == [1] * 9 + [2]  # 0 .. 10: ten bins, the last one closed
    assert values["outputs"][1]["counts"][5] == 11  # a constant: one bin around it
    assert s["runs"] == [] and s["results"] == 0 and s["drift"] == {"psi": 0.1, "mean_confidence": None,
                                                                    "reported_at": 50.0}
    page = render(r1, 3_000.0)
    assert "predicted values" in page and page.count('class="values"') == 3 and "latest 11 results" in page
    assert "none reported yet" in render(a, 3_000.0) and "no results stored yet" in render(s, 3_000.0)


def test_values_and_truths_past_a_floats_range_leave_the_figures_finite(tmp_path: Path, caplog) -> None:
    """A hostile peer's findings: values of +-1.7e308 made the device page's histogram a 503 ("database
    unavailable", numpy's "too many bins"); a truth "inf" made the fleet's error figures inf, null in the JSON,
    and the live page stopped drawing. An error past a float's range, or against a truth that is no finite
    number, is no error (NaN, as for a missing truth); and a bug is a 500 naming itself, not a database away."""
    import numpy as np
    import sqlalchemy as sa

    from cloud_hub.data.device_history import device_history
    from cloud_hub.data.store import Store
    from cloud_hub.data.summaries import Errors, result_errors
    from cloud_hub.web.http_door import error_answer

    big = [orjson.dumps([x]).decode() for x in (1.7e308, -1.7e308, 0.0)]
    errors = result_errors([*big, "[1.0]", "[1.0]", "[2.0, 1e200]"], ["0", "0", "0", "inf", "nan", "0;0"])
    assert errors.tolist()[2] == 0.0 and all(e != e for e in errors.tolist()[:2] + errors.tolist()[3:]), errors
    top = Errors.of(np.array([1.7e308, 1.7e308, 1.0]))
    assert top is not None and top.mean == pytest.approx(1.7e308 / 3 * 2) and top.median == 1.7e308  # no inf mean
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    with sessions.transaction(engine) as conn:
        Store(engine).insert_results(conn, [ResultRow("big", i, i, i + 1.0, 1, None, None, v, None, 1.0, None, 5.0)
                                            for i, v in enumerate(big)])
    with sessions.transaction(engine, write=False) as conn:
        view = device_history(conn, "big")
    engine.dispose()
    assert view is not None
    (hist,) = view["values"]["outputs"]
    assert sum(hist["counts"]) == 3 and hist["edges"][0] == -1.7e308 and hist["edges"][-1] == 1.7e308
    assert error_answer(sa.exc.OperationalError("SELECT", {}, Exception("gone"))) == (
        "503 Service Unavailable", "database unavailable: gone")
    with caplog.at_level("ERROR", logger="cloud_hub.web.http_door"):
        status, text = error_answer(ZeroDivisionError("float division by zero"))
    assert status == "500 Internal Server Error" and "float division by zero" in caplog.text
    assert text == "hub error (its log has the traceback): float division by zero"


def test_a_devices_bidirectional_controls_are_shown_not_obeyed(browser, tmp_path: Path) -> None:
    """A right-to-left override in a device's text (a label, its last error) makes "gol.exe" of "exe.log": the
    text read is not the text stored. The device page and the live page write such controls out as \\uNNNN, as
    the CLI's tables do; the live page's own escaping runs in Chromium."""
    import re

    from cloud_hub.data.device_history import device_history
    from cloud_hub.data.store import Store
    from cloud_hub.web.dashboard import PAGE
    from cloud_hub.web.device_page import render
    from edge_agent import contract as c

    with backend_engine("sqlite", tmp_path) as engine:
        with sessions.transaction(engine) as conn:
            Store(engine).insert_results(conn, [ResultRow("d1", 1, 0.0, 2.0, 1, "\u202ewalk", 0.9, None, None, 1.0,
                                                          None, 10.0)])
            Store(engine).apply_statuses(conn, {"d1": (c.Status("d1", c.ONLINE, 5.0, "m\u2066", 1, None, 0,
                                                                "open \u202egol.exe\x1b[2J"), 6.0)})
        with sessions.transaction(engine, write=False) as conn:
            view = device_history(conn, "d1")
    assert view is not None
    page = render(view, 20.0)
    assert not re.search("[\u202e\u2066\x1b]", page), page
    assert "open \\u202egol.exe\\x1b[2J" in page and "\\u202ewalk" in page and "m\\u2066" in page

    esc = re.search(r"^const esc = .*?;$", PAGE, re.M | re.S)  # no % in it: the template is the text
    assert esc is not None
    browser.get("about:blank")  # type: ignore[attr-defined]
    shown = browser.execute_script(esc.group(0) + " return [esc('a\\u202e<b>\\u2069\\u0007'), esc(null)];")  # type: ignore[attr-defined]
    assert shown == ["a\\u202e&lt;b&gt;\\u2069\\x07", "-"]  # as the CLI writes them
