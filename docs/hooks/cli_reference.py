"""MkDocs hook: the command-line reference, generated at build time from the Typer apps.

The apps are found the way ``pip`` finds them: the ``[project.scripts]`` table of ``pyproject.toml``
(``edge-agent = "edge_agent.device.cli:app"``), read again on every build, so a module that moves only needs
its entry point updated. Each app becomes a click command (``typer.main.get_command``) and every
command and sub-command is rendered: usage, help, and each argument and option with its type, default
and help. The page (``cli.md``) exists only in the build; nothing is written to the repository.
"""

from __future__ import annotations

import html
import importlib
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

PAGE = "cli.md"

_INTRO = """\
# CLI reference

Generated from the Typer apps named in `pyproject.toml` (`[project.scripts]`) each time the site is
built; the same text as `--help`. What the commands are for, settings and exit codes:
[Commands](commands.md); settings files and environment variables: [Configuration](configuration.md).
Every command also takes `-h` / `--help`.
"""


def _project_root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def _scripts(root: Path) -> dict[str, str]:
    pyproject = root / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PluginError(f"cli_reference: cannot read {pyproject}: {exc}") from exc
    scripts = data.get("project", {}).get("scripts", {})
    if not scripts:
        raise PluginError(f"cli_reference: {pyproject} has no [project.scripts]")
    return dict(scripts)


def _purge(packages: set[str]) -> None:
    """Forget modules of the project imported by an earlier build (``mkdocs serve`` rebuilds in-process)."""
    for name in list(sys.modules):
        if name.split(".", 1)[0] in packages:
            del sys.modules[name]


def _load(name: str, target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise PluginError(f"cli_reference: entry point {name} = {target!r} names no object (module:attr)")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:  # e.g. cloud_hub.cli.app stops when the hub extra is missing
        raise PluginError(f"cli_reference: importing {module_name} (entry point {name}) exited with {exc.code}; "
                          "is the project installed with its extras (pip install -e '.[dev]')?") from exc
    except Exception as exc:
        raise PluginError(f"cli_reference: cannot import {module_name} (entry point {name} = {target!r}): "
                          f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginError(f"cli_reference: {module_name} has no {attr} (entry point {name})") from exc
    import typer
    import typer.main

    if isinstance(obj, typer.Typer):
        return typer.main.get_command(obj)
    if hasattr(obj, "get_params") and hasattr(obj, "context_class"):  # already a click command
        return obj
    raise PluginError(f"cli_reference: entry point {name} = {target!r} is neither a Typer app nor a click command")


_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_MD_SPECIAL = re.compile(r"([\\*_\[\]|])")


def _text(value: str, table: bool = False) -> str:
    """Help text as Markdown: backtick spans kept as code, everything else literal."""
    value = value.replace("\\[", "[")  # rich markup's escaped bracket, as --help prints it
    out = []
    pos = 0
    for m in _CODE_SPAN.finditer(value):
        out.append(_plain(value[pos:m.start()], table))
        out.append(m.group(0))  # Python-Markdown's tables leave a | inside backticks alone
        pos = m.end()
    out.append(_plain(value[pos:], table))
    return "".join(out)


def _plain(value: str, table: bool) -> str:
    value = html.escape(value, quote=False)
    value = _MD_SPECIAL.sub(r"\\\1", value)
    if table:
        value = re.sub(r"\s+", " ", value)
    return value


def _paragraphs(help_text: str) -> str:
    """Click's help conventions: blank lines split paragraphs, ``\\b`` keeps a paragraph's line breaks."""
    blocks = []
    for block in re.split(r"\n\s*\n", help_text.strip()):
        if block.startswith("\b"):
            lines = [_text(line.strip()) for line in block[1:].strip("\n").splitlines()]
            blocks.append("<br>\n".join(lines))
        else:
            blocks.append(_text(" ".join(block.split())))
    return "\n\n".join(blocks)


def _is_option(param: Any) -> bool:
    return bool(param.param_type_name == "option")


def _is_flag(param: Any) -> bool:
    return _is_option(param) and bool(param.is_flag) and not param.count


def _type(param: Any, ctx: Any) -> str:
    ptype = param.type
    if _is_flag(param):
        return "flag"
    if getattr(ptype, "choices", None):
        return " \\| ".join(f"`{c}`" for c in ptype.choices)
    name = param.metavar or ptype.name  # as --help shows it: str, float, path, int
    if param.nargs == -1 or param.multiple:
        name += " ..."
    return f"`{name}`"


def _default(param: Any, ctx: Any) -> str:
    if param.required:
        return "required"
    if _is_flag(param) and param.secondary_opts:
        default = param.get_default(ctx, call=False)
        opts = param.opts if default else param.secondary_opts
        return f"`{opts[0]}`" if opts else ""
    default = param.get_default(ctx, call=False)
    if callable(default):
        return "(computed)"
    if default is None or default == () or default == []:
        return ""
    if isinstance(default, bool):
        return "`true`" if default else "`false`"
    if isinstance(default, list | tuple):
        return ", ".join(f"`{d}`" for d in default)
    return f"`{default}`"


def _names(param: Any) -> str:
    if _is_option(param):
        names = list(param.opts)
        if param.secondary_opts:
            names = [f"{'/'.join(param.opts)} / {'/'.join(param.secondary_opts)}"]
        return ", ".join(f"`{n}`" for n in names)
    return f"`{(param.human_readable_name or param.name or '').upper()}`"


def _params_table(params: list[Any], ctx: Any, title: str) -> list[str]:
    if not params:
        return []
    kind = "Argument" if title == "Arguments" else "Option"
    lines = [f"**{title}**", "", f"| {kind} | Type | Default | Help |", "| --- | --- | --- | --- |"]
    for param in params:
        help_text = getattr(param, "help", None) or ""  # typer's arguments carry help too
        extra = []
        envvar = getattr(param, "envvar", None)
        if envvar:
            extra.append("env: " + ", ".join(f"`{e}`" for e in ([envvar] if isinstance(envvar, str) else envvar)))
        if getattr(param, "deprecated", False):
            extra.append("deprecated")
        cell = _text(help_text, table=True)
        if extra:
            cell = (cell + " " if cell else "") + "(" + "; ".join(extra) + ")"
        lines.append(f"| {_names(param)} | {_type(param, ctx)} | {_default(param, ctx)} | {cell} |")
    lines.append("")
    return lines


def _render(cmd: Any, ctx: Any, level: int, out: list[str]) -> None:
    """One command, then its sub-commands. Duck-typed: typer >= 0.2x bundles its own copy of click."""
    path = ctx.command_path
    heading = "#" * min(level, 6)
    out += [f"{heading} `{path}`", ""]
    if getattr(cmd, "deprecated", False):
        out += ["*Deprecated.*", ""]
    help_text = cmd.help or cmd.short_help or ""
    if help_text:
        out += [_paragraphs(help_text), ""]
    usage = cmd.collect_usage_pieces(ctx)
    out += ["```text", " ".join(["Usage:", path, *usage]), "```", ""]
    visible = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)]
    help_names = set(ctx.help_option_names)
    arguments = [p for p in visible if p.param_type_name == "argument"]
    options = [p for p in visible if _is_option(p) and not (set(p.opts) & help_names)]
    out += _params_table(arguments, ctx, "Arguments")
    out += _params_table(options, ctx, "Options")
    if hasattr(cmd, "list_commands"):  # a group
        names = [n for n in cmd.list_commands(ctx) if (sub := cmd.get_command(ctx, n)) and not sub.hidden]
        if names:
            out += ["**Commands**", ""]
            for name in names:
                sub = cmd.get_command(ctx, name)
                assert sub is not None
                summary = _text(_summary(sub), table=True)
                anchor = _slug(f"{path} {name}")
                out.append(f"- [`{name}`](#{anchor}): {summary}")
            out.append("")
            for name in names:
                sub = cmd.get_command(ctx, name)
                assert sub is not None
                _render(sub, sub.context_class(sub, info_name=name, parent=ctx), level + 1, out)


def _summary(cmd: Any) -> str:
    """The first paragraph of a command's help (click's own short help drops spaces around backticks)."""
    text = cmd.short_help or cmd.help or ""
    return " ".join(re.split(r"\n\s*\n", text.strip().lstrip("\b"))[0].split())


def _slug(text: str) -> str:
    # Python-Markdown's default toc slugify: lowercase, drop what is not a word character, space or -.
    value = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def render_reference(root: Path) -> str:
    scripts = _scripts(root)
    packages = {target.split(":", 1)[0].split(".", 1)[0] for target in scripts.values()}
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # document the checkout being built
    _purge(packages)
    out = [_INTRO]
    for name, target in scripts.items():
        cmd = _load(name, target)
        _render(cmd, cmd.context_class(cmd, info_name=name), 2, out)
    return "\n".join(out).rstrip() + "\n"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    content = render_reference(_project_root(config))
    existing = files.get_file_from_path(PAGE)
    if existing is not None:
        raise PluginError(f"cli_reference: docs/{PAGE} exists; it is generated, remove it")
    files.append(File.generated(config, PAGE, content=content))
    return files
