"""What the operator reads is about what it says (issue 24): `train` names a log without labels before
reading anything through."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cloud_hub.cli import app
from edge_agent import exits
from tests.helpers import make_log


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_train_says_a_log_has_no_label_column_before_reading_the_logs_through(tmp_path: Path) -> None:
    """The labelled log comes first and breaks on its last line: reading it through (devices, windows)
    would stop there, so the message about the second log proves only headers were read before it."""
    good = make_log(tmp_path / "good.csv", seconds=20)
    good.write_text(good.read_text() + "not,a,reading\n")
    lines = make_log(tmp_path / "raw.csv", seconds=20).read_text().splitlines()
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    code, out, err = invoke("train", str(good), str(unlabelled), "--db", f"sqlite:///{tmp_path / 'hub.sqlite'}")
    assert code == exits.MODEL, (code, out, err)
    assert f"{unlabelled}: no label column, cannot train from it" in err, err
    assert "line" not in err, err  # not the malformed last line of the first log
