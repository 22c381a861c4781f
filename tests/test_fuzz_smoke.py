"""The fuzz targets (fuzz/targets.py) in the suite: each decoder over its seed corpus and a short fixed-seed
mutation pass. A decoder that lets another exception out, hangs, or stops round-tripping fails here; the
long coverage-guided runs are bench/fuzz.py's (README: Benchmarks)."""

from __future__ import annotations

import pytest

from fuzz.engine import corpus, fuzz_random
from fuzz.targets import TARGETS

# inputs per target: the log targets parse every input five ways (whole, in pieces, raising, line by line,
# written back), so fewer of them; a few seconds in all
RUNS = {"log_csv": 600, "log_jsonl": 800, "log_gz": 800, "settings": 600}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_decoder_keeps_its_property_on_its_corpus_and_mutants(name: str) -> None:
    report = fuzz_random(name, runs=RUNS.get(name, 2500), seed=29, per_input_s=10)
    assert report.inputs > len(corpus(name)), report
    assert not report.failures, "\n".join(f"{why}\n  input: {data!r:.400}" for data, why in report.failures[:3])
    assert report.grew_mb < 64, f"{name}: {report.grew_mb:.0f} MB more resident after {report.inputs} inputs"


def test_a_hang_and_a_stray_exception_are_findings_with_their_input() -> None:
    """The engine itself: an input that never returns is stopped and reported, as is a bare ValueError."""
    hang = corpus("status")[0]

    def target(data: bytes) -> None:
        while data == hang:
            pass
        if data.startswith(b"{") and data.endswith(b"}"):
            raise ValueError("not the contract's error")

    report = fuzz_random("status", runs=300, seed=29, per_input_s=0.2, target=target)
    kinds = {why.split(":")[0] for _, why in report.failures}
    assert (hang, "Hang: input took too long") in report.failures and kinds == {"Hang", "ValueError"}, report.failures


def test_the_http_target_finds_a_door_left_open(tmp_path) -> None:
    """The HTTP door's property can fail: a hub serving without its token answers 200 to anyone."""
    from fuzz import http_door

    request = b"GET /api/fleet HTTP/1.1\r\nHost: hub\r\n\r\n"
    http_door.check(http_door.Door(tmp_path / "shut"), request)  # with the token: a 401, the property holds
    with pytest.raises(AssertionError, match="a 200 without the token"):
        http_door.check(http_door.Door(tmp_path / "open", token=None), request)
