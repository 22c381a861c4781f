"""A device that is not our agent: mosquitto_pub / mosquitto_sub speaking MQTT 3.1.1, with payloads
written by hand from the README's examples, through a real broker into a real `cloud-hub serve`."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from cloud_hub.data import db, tables
from cloud_hub.tools.local_broker import LocalBroker
from edge_agent import contract as c
from tests.helpers import Processes, wait_for
from tests.test_hub_cli import ServeProcess
from tests.test_ingest import stored_keys

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "docs" / "contract.md"


def pub(broker: LocalBroker, topic: str, payload: str, *extra: str) -> None:
    subprocess.run(["mosquitto_pub", "-V", "mqttv311", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", topic, "-m", payload, *extra], check=True, timeout=30)


def device_row(url: str, device: str) -> dict | None:
    engine = db.make_engine(url, create=False)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(tables.devices).where(tables.devices.c.device_id == device)).mappings().first()
            return dict(row) if row else None
    finally:
        engine.dispose()


def dead_letters(url: str) -> list[dict]:
    engine = db.make_engine(url, create=False)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(tables.dead_letters)).mappings()]
    finally:
        engine.dispose()


def readme_example(name: str) -> str:
    """The JSON of a worked example in the README (a ```json block right after `<!-- example: name -->`)."""
    text = README.read_text()
    start = text.index(f"<!-- example: {name} -->")
    block = text[text.index("```json", start) + 7:]
    return block[:block.index("```")].strip()


def test_a_plain_mqtt_311_client_stores_results_once_and_reads_its_receipts(
        procs: Processes, broker: LocalBroker, prefix: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    device = "mcu-7"
    topics = c.Topics(prefix)
    received = tmp_path / "receipts.txt"
    with open(received, "wb") as out:
        sub = procs.popen(["stdbuf", "-oL", "mosquitto_sub", "-V", "mqttv311", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                           "-i", f"{device}-rx", "-t", topics.receipts(device), "-d"], stdout=out, stderr=out)
    wait_for(lambda: b"SUBACK" in received.read_bytes(), what="mosquitto_sub to subscribe")
    # The status, retained, with the last will the README shows; then the README's results example,
    # twice, as a device that never heard its receipt sends it again.
    pub(broker, topics.status(device), readme_example("status"), "-r")
    results = readme_example("results")
    for _ in range(2):
        pub(broker, topics.results(device), results)
    expected = {(device, r["seq"]) for r in orjson.loads(results)["results"]}
    def receipted() -> set[int]:
        return {s for ln in received.read_text().splitlines() if ln.startswith("{")
                for s in c.decode_receipt(ln.encode(), device).seqs()}

    # One receipt per commit: the two copies may land in one batch or in two.
    wait_for(lambda: receipted() == {s for _, s in expected}, what="the receipts of every result")
    assert sorted(stored_keys(url)) == sorted(expected), "stored once, however often sent"
    wait_for(lambda: (device_row(url, device) or {}).get("state") == c.ONLINE, what="the status stored")

    # A payload the contract refuses goes to the dead letters with the reason, and nothing else stops.
    pub(broker, topics.results(device), '{"v": 1, "device_id": "mcu-7", "results": [{"seq": "one"}]}')
    wait_for(lambda: len(dead_letters(url)) == 1, what="a dead letter")
    letter = dead_letters(url)[0]
    assert letter["topic"] == topics.results(device) and "missing" in letter["reason"], letter

    # A device that never reads receipts still delivers at least once; the hub stores each result once.
    pub(broker, topics.results("mcu-8"), results.replace('"mcu-7"', '"mcu-8"'))
    wait_for(lambda: len(stored_keys(url)) == 2 * len(expected), what="the second device's results")
    sub.send_signal(signal.SIGTERM)
    assert hub.signal(signal.SIGTERM) == 0


def test_the_last_will_of_a_plain_client_marks_it_offline(procs: Processes, broker: LocalBroker, prefix: str,
                                                          tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    hub = ServeProcess(procs, broker, url, prefix, tmp_path / "hub.log")
    hub.wait_started()
    device = "mcu-9"
    topics = c.Topics(prefix)
    will = readme_example("will").replace('"mcu-7"', f'"{device}"')
    out = tmp_path / "client.txt"
    with open(out, "wb") as sink:
        client = procs.popen(["stdbuf", "-oL", "mosquitto_sub", "-V", "mqttv311", "-h", "127.0.0.1", "-p", str(broker.port),
                              "-i", device, "-t", topics.receipts(device), "-d", "-k", "5",
                              "--will-topic", topics.status(device), "--will-payload", will,
                              "--will-qos", "1", "--will-retain"], stdout=sink, stderr=sink)
    wait_for(lambda: b"SUBACK" in out.read_bytes(), what="the client to connect")
    pub(broker, topics.status(device), readme_example("status").replace('"mcu-7"', f'"{device}"'), "-r")
    wait_for(lambda: (device_row(url, device) or {}).get("state") == c.ONLINE, what="online")
    client.kill()  # no DISCONNECT: the broker publishes the will
    wait_for(lambda: (device_row(url, device) or {}).get("state") == c.OFFLINE, timeout=30, what="the will")
    assert hub.signal(signal.SIGTERM) == 0
