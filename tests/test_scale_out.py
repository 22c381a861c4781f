"""Scaling out: two `cloud-hub serve` processes split one fleet through an MQTT 5 shared subscription
and write to one PostgreSQL database; every result is stored exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_hub.tools.local_broker import LocalBroker
from tests.conftest import postgres_url
from tests.helpers import Processes, run_agent
from tests.test_ingest import stored_keys, wait_for
from tests.test_pipeline_e2e import fleet  # noqa: F401 - the module fixture

PG = postgres_url()
pytestmark = pytest.mark.skipif(PG is None, reason="no PostgreSQL reachable on 127.0.0.1:5432")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh database for this test on the reachable server, dropped afterwards."""
    assert PG is not None
    admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
    name = f"edgeml_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield str(sa.engine.make_url(PG).set(database=name).render_as_string(hide_password=False))
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _serve(procs: Processes, broker: LocalBroker, url: str, prefix: str, name: str, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    proc = procs.popen(
        [sys.executable, "-m", "cloud_hub", "serve", "--broker", broker.url, "--db", url, "--prefix", prefix,
         "--client-id", name, "--share-group", "hubs"], stdout=out, stderr=out,
        env={**os.environ, "CLOUD_HUB_LOG_INTERVAL_S": "1"})
    out.close()
    wait_for(lambda: " ingesting " in log.read_text() or proc.poll() is not None, what=f"{name} started")
    assert proc.poll() is None, log.read_text()
    return proc


def test_two_hubs_share_the_fleet_into_one_postgres(procs, broker, prefix, tmp_path, fleet, pg_database) -> None:  # noqa: F811
    log, model, expected = fleet
    hubs = [_serve(procs, broker, pg_database, prefix, f"{prefix}-hub{i}", tmp_path / f"hub{i}.log") for i in range(2)]
    res = run_agent("replay", str(log), "--broker", broker.url, "--model", str(model), "--prefix", prefix,
                    "--state-dir", str(tmp_path / "s"), "--json", env={"EDGE_AGENT_BATCH_MAX_RESULTS": "5"})
    assert res.returncode == 0, res.stderr
    # The replay exits once both hubs have receipted every result: nothing left to wait for.
    assert len(stored_keys(pg_database)) == len(expected)
    for proc in hubs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    keys = stored_keys(pg_database)
    assert len(keys) == len(expected) and set(keys) == expected
    finals = [next(ln for ln in (tmp_path / f"hub{i}.log").read_text().splitlines() if "final:" in ln)
              for i in range(2)]
    stored = [int(line.split(" rows stored")[0].rsplit(" ", 1)[1]) for line in finals]
    assert all(n > 0 for n in stored) and sum(stored) == len(expected), finals
