"""`cloud-hub federate`'s options and FederateConfig say the same thing: every field a user may set has
one option, under a known name, whose default is the field's default (one meaning, one place: a default
changed in FederateConfig and not in the command line fails here)."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from cloud_hub.cli.app import app
from cloud_hub.rounds.config import FederateConfig

# option (Python parameter) -> FederateConfig field, where the names differ
RENAMED = {"wait_devices": "wait_devices_s", "deadline": "deadline_s", "budget": "budget_s",
           "holdout_log": "holdout_logs", "fp32_deltas": "encoding", "fp32_announcements": "weights_dtype"}
NOT_AN_OPTION = {"refuse_factor"}  # a safety bound of the hub, not a knob (3 x clip)


def federate_options() -> dict[str, object]:
    group = typer.main.get_command(app)
    command = group.commands["federate"]  # type: ignore[attr-defined]
    return {p.name: p.default for p in command.params}


def test_every_federate_config_field_has_an_option_with_its_default() -> None:
    options = federate_options()
    fields = {f.name: f.default for f in dataclasses.fields(FederateConfig)}
    by_field = {RENAMED.get(name, name): (name, default) for name, default in options.items()}
    missing = sorted(set(fields) - set(by_field) - NOT_AN_OPTION)
    assert not missing, f"FederateConfig fields without a federate option: {missing}"
    for field, default in fields.items():
        if field in NOT_AN_OPTION:
            continue
        option, shown = by_field[field]
        if field == "encoding":
            assert (default == "int8") is (shown is False), "--fp32-deltas off must mean the config's encoding"
        elif field == "weights_dtype":
            assert (default == "float16") is (shown is False), "--fp32-announcements off: the config's dtype"
        elif field == "holdout_logs":
            assert tuple(shown or ()) == default
        else:
            assert shown == default, f"--{option.replace('_', '-')} defaults to {shown!r}, FederateConfig.{field} " \
                                     f"to {default!r}"


def test_a_secure_round_with_too_few_devices_asked_says_which_way_to_move_fraction() -> None:
    """A new operator's finding: --secure --fraction 0.3 with 3 devices online asked 1, and the error said
    "1 available: lower --fraction", the opposite of the fix."""
    import random

    from cloud_hub.rounds.config import RoundError
    from cloud_hub.rounds.opening import _secure_params

    with pytest.raises(RoundError, match=r"1 of the 3 available asked: raise --fraction \(0\.3 of 3 asks 1\)"):
        _secure_params(FederateConfig(secure=True, fraction=0.3), ["d1"], 3, random.Random(0))
    with pytest.raises(RoundError, match=r"2 of the 2 available asked: wait for more devices"):
        _secure_params(FederateConfig(secure=True), ["d1", "d2"], 2, random.Random(0))
