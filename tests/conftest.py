"""Shared fixtures: a real mosquitto on a free loopback port, unique topic prefixes, a PostgreSQL probe."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_hub.tools.local_broker import LocalBroker, port_open
from tests.helpers import Processes


@pytest.fixture(scope="session")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """One broker for the tests that never stop it."""
    broker = LocalBroker(tmp_path_factory.mktemp("mosquitto-shared")).start()
    yield broker
    broker.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of this test's own: stop, kill and restart it at will."""
    broker = LocalBroker(tmp_path / "mosquitto").start()
    yield broker
    broker.kill()


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Spawn processes through this: each one is killed by pid when the test ends, passed or failed."""
    owner = Processes()
    yield owner
    owner.kill_all()


_counter = itertools.count()


@pytest.fixture
def prefix() -> str:
    """A topic prefix unique to this test, so tests on a shared broker never see each other."""
    return f"t{next(_counter)}-{uuid.uuid4().hex[:8]}"


def postgres_url() -> str | None:
    url = os.environ.get("EDGEML_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    if url == "off" or not port_open("127.0.0.1", 5432):
        return None
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception:  # any failure means "not reachable here": skip, don't fail
        return None
    return url
