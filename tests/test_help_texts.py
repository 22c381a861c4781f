"""Help texts wrap cleanly, in every command of both apps: no line break inside a paragraph of a command's or an
option's help (typer's rich mode keeps such a break where it is, so a hard-wrapped text shows as broken lines),
and `--help` shows every text whole, within 80 and within 200 columns."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from cloud_hub.cli.app import app as hub_app
from edge_agent.device.cli import app as agent_app

APPS: dict[str, typer.Typer] = {"cloud-hub": hub_app, "edge-agent": agent_app}
BOX = re.compile(r"[\s│╭╮╰╯─]+")
runner = CliRunner()


def _walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, [*path, name])


COMMANDS = [found for name, app in APPS.items() for found in _walk(typer.main.get_command(app), [name])]


def _paragraphs(text: str | None) -> list[str]:
    """A help text's paragraphs as typer shows them (up to a ``\\f``), without those marked ``\\b``."""
    body = inspect.cleandoc(text or "").partition("\f")[0]
    return [p for p in re.split(r"\n\s*\n", body) if p.strip() and not p.startswith("\b")]


def _options(command: Any) -> list[tuple[str, str]]:
    return [(param.name, param.help) for param in command.params
            if getattr(param, "help", None) and not getattr(param, "hidden", False)]


def _page(command: Any) -> list[tuple[str, str]]:
    """(what, text): every text the command's `--help` page shows."""
    texts = [("help", p) for p in _paragraphs(command.help)] + _options(command)
    for name, sub in getattr(command, "commands", {}).items():  # a group lists its commands' first paragraphs
        if not sub.hidden:
            texts += [(f"command {name}", sub.short_help or (_paragraphs(sub.help) or [""])[0])]
    return [(what, text) for what, text in texts if text]


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_no_line_break_inside_a_paragraph_of_help(path: list[str], command: Any) -> None:
    texts = [("help", command.help), ("short help", command.short_help), *_options(command)]
    broken = []
    for what, text in texts:
        for paragraph in _paragraphs(text):
            lines = paragraph.splitlines()
            broken += [f"{what}: ...{a.strip()[-40:]!r} <line break> {b.strip()[:40]!r}..."
                       for a, b in zip(lines, lines[1:], strict=False)]
    assert not broken, (f"`{' '.join(path)} --help` breaks these lines where the source does: write each paragraph "
                        "as one string (implicit concatenation) or one docstring line:\n" + "\n".join(broken))


def _help(path: list[str], columns: int) -> str:
    res = runner.invoke(APPS[path[0]], [*path[1:], "--help"], env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_fits_the_width_and_cuts_nothing(path: list[str], command: Any, columns: int) -> None:
    shown = _help(path, columns)
    assert max(len(line) for line in shown.splitlines()) <= columns, "wider than the terminal"
    written = sum(text.count("…") for _, text in _page(command))
    assert shown.count("…") <= written, f"a name or a text is cut short (…) at {columns} columns:\n{shown}"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_shows_each_text_as_written_on_one_line(path: list[str], command: Any) -> None:
    """On a terminal wide enough, each paragraph is one line, as written (rich markup eats ``[word]``)."""
    lines = {" ".join(BOX.sub(" ", line).split()) for line in _help(path, 1000).splitlines()}
    for what, text in _page(command):
        text = " ".join(text.replace("\\[", "[").split())  # \[ escapes rich markup: shown as [
        assert any(text in line for line in lines), f"{what}: {text!r} is not shown on one line as written"


def test_the_first_steps_in_cloud_hub_help_are_commands_and_options_that_exist() -> None:
    """`cloud-hub --help` says what to run first: each `cloud-hub ...` it names is a command with those options."""
    root = typer.main.get_command(hub_app)
    named = re.findall(r"`cloud-hub ([^`]+)`", root.help or "")
    assert {"demo", "train"} <= {words.split()[0] for words in named}, named
    for words in named:
        name, *args = words.split()
        command = root.commands.get(name)
        assert command is not None, f"`cloud-hub {words}`: no command {name}"
        options = {opt for param in command.params for opt in param.opts}
        assert {a for a in args if a.startswith("-")} <= options, f"`cloud-hub {words}`: an option {name} lacks"
