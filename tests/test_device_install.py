"""A device install carries the agent and nothing of the hub (issue #25).

``deploy/agent/pyproject.toml`` builds the device distribution ``edgeml-agent``: all of ``edge_agent``
(the shared library and ``edge_agent.device``), the ``edge-agent`` command and the device dependencies,
and no ``cloud_hub`` (no signing code, no demo, no ``cloud-hub`` command). ``deploy/Dockerfile.agent``
installs it. These tests build that wheel from exactly the files the Dockerfile copies, read its
contents and metadata, install it into a venv of its own and run ``edge-agent`` from there.

The device project mirrors the root ``pyproject.toml`` (version, base dependencies, the agent-metrics
extra, the ``edge-agent`` entry point): the first test fails as soon as the two drift apart.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
AGENT_PROJECT = ROOT / "deploy" / "agent"
DOCKERFILE = ROOT / "deploy" / "Dockerfile.agent"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.agent.dockerignore"

# The hub's dependencies: none may reach a device.
HUB_ONLY = {"sqlalchemy", "alembic", "onnx", "scikit-learn", "skl2onnx", "psycopg"}
# What only code that signs carries: a private key (cloud_hub.models.signing, the rollout, keygen).
SIGNING = re.compile(r"private_key|sign_bundle|Ed25519PrivateKey")


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _reqs(specs: list[str]) -> set[str]:
    """Requirements compared by meaning (name case, spacing, specifier order do not matter)."""
    out = set()
    for spec in specs:
        req = Requirement(spec)
        req.name = canonicalize_name(req.name)
        out.add(str(req))
    return out


def _signing_hits(text: str) -> list[str]:
    return sorted(set(SIGNING.findall(text)))


def test_the_device_project_mirrors_the_root_project() -> None:
    import edge_agent

    root, agent = _toml(ROOT / "pyproject.toml")["project"], _toml(AGENT_PROJECT / "pyproject.toml")["project"]
    assert agent["name"] == "edgeml-agent"
    assert agent["version"] == root["version"] == edge_agent.__version__
    assert agent["requires-python"] == root["requires-python"]
    assert agent["license"] == root["license"]
    assert _reqs(agent["dependencies"]) == _reqs(root["dependencies"]), \
        "deploy/agent/pyproject.toml's dependencies differ from the root pyproject's base dependencies"
    assert set(agent.get("optional-dependencies", {})) == {"agent-metrics"}
    assert _reqs(agent["optional-dependencies"]["agent-metrics"]) == \
        _reqs(root["optional-dependencies"]["agent-metrics"])
    assert agent["scripts"] == {"edge-agent": root["scripts"]["edge-agent"]}
    assert not {canonicalize_name(Requirement(s).name) for s in agent["dependencies"]} & HUB_ONLY


# --- deploy/Dockerfile.agent, read as text (no Docker daemon needed) -----------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) per instruction, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for text in logical:
        word, _, rest = text.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _build_stage_plan(dockerfile: Path) -> tuple[list[tuple[str, str]], str]:
    """The first stage's context copies as (source in the context, absolute destination in the image),
    and the absolute path the stage runs ``pip install`` on."""
    copies: list[tuple[str, str]] = []
    install: str | None = None
    workdir = PurePosixPath("/")
    stages = 0
    for word, rest in _instructions(dockerfile):
        if word == "FROM":
            stages += 1
            if stages > 1:
                break
        elif word == "WORKDIR":
            workdir = workdir / rest
        elif word in ("COPY", "ADD"):
            args = shlex.split(rest)
            assert not any(a.startswith("--from") for a in args), "the build stage copies from the context only"
            args = [a for a in args if not a.startswith("--")]
            *sources, dest = args
            target = workdir / dest
            for src in sources:
                if dest.endswith("/") or len(sources) > 1:
                    copies.append((src, str(target / PurePosixPath(src).name)))
                else:
                    copies.append((src, str(target)))
        elif word == "RUN":
            m = re.search(r"pip install (\S+)", rest)
            if m:
                assert install is None, "one pip install in the build stage"
                install = str(workdir / m.group(1))
    assert install is not None, "the build stage runs no pip install"
    return copies, install


def test_the_agent_image_copies_no_hub_code() -> None:
    _, install = _build_stage_plan(DOCKERFILE)
    sources = []  # from the build context, in any stage
    for word, rest in _instructions(DOCKERFILE):
        args = shlex.split(rest)
        if word in ("COPY", "ADD") and not any(a.startswith("--from") for a in args):
            sources += [a for a in args if not a.startswith("--")][:-1]
    for src in sources:
        parts = PurePosixPath(src).parts
        assert parts and parts[0] not in (".", "cloud_hub") and "*" not in src, f"COPY {src}: more than the agent"
    assert set(sources) == {"deploy/agent/pyproject.toml", "edge_agent"}
    assert install == "/src/deploy/agent"
    text = DOCKERFILE.read_text()
    assert "[hub" not in text
    # The context itself: everything excluded but the two sources above.
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == set(sources)
    # What the image runs is unchanged: its own user, the agent as PID 1, the config path.
    assert "USER edge-agent" in text and 'ENTRYPOINT ["edge-agent"]' in text
    assert 'CMD ["run", "--config", "/etc/edge-agent/agent.toml"]' in text


# --- the wheel itself ------------------------------------------------------------------------------------


def _pip_wheel(project: Path, out: Path) -> Path:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(out), str(project)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (
        f"building {project} failed (is hatchling installed? `pip install -e '.[dev]'`):\n{res.stderr}")
    (wheel,) = out.glob("edgeml_agent-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built as the Dockerfile builds it: a context holding only what its COPY lines bring in."""
    copies, install = _build_stage_plan(DOCKERFILE)
    image = tmp_path_factory.mktemp("image")
    for src, dest in copies:
        source, target = ROOT / src, image / dest.lstrip("/")
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    built = _pip_wheel(image / install.lstrip("/"), tmp_path_factory.mktemp("wheel-docker"))
    # ... and it is the same wheel as the one built in place (the README's command).
    in_place = _pip_wheel(AGENT_PROJECT, tmp_path_factory.mktemp("wheel-in-place"))
    with zipfile.ZipFile(built) as a, zipfile.ZipFile(in_place) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
    return built


def _dist_info(names: list[str], file: str) -> str:
    (path,) = [n for n in names if re.fullmatch(rf"edgeml_agent-[^/]+\.dist-info/{file}", n)]
    return path


@pytest.mark.slow
def test_the_wheel_holds_all_of_edge_agent_and_nothing_of_the_hub(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    assert {n.split("/")[0] for n in names} == {"edge_agent", _dist_info(names, "METADATA").split("/")[0]}
    assert not [n for n in names if n.startswith("cloud_hub/") or "/cloud_hub/" in n]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # No signing code: the detector flags the hub's signing module, and nothing in the wheel.
    signers = [p for p in (ROOT / "cloud_hub").rglob("*.py") if "def sign_bundle" in p.read_text()]
    assert signers, "the hub's signing module was not found: update this test's self-check"
    for p in signers:
        assert _signing_hits(p.read_text()), f"the signing check would miss {p}"
    assert {n: hits for n, text in sources.items() if (hits := _signing_hits(text))} == {}
    # All of edge_agent (the device and the shared library), as in the repository.
    tree = {str(p.relative_to(ROOT)) for p in (ROOT / "edge_agent").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    assert {n for n in names if n.startswith("edge_agent/")} == tree
    assert "edge_agent/device/cli.py" in names


class _EntryPoints(configparser.ConfigParser):
    def optionxform(self, optionstr: str) -> str:  # names as written (ConfigParser lower-cases them)
        return optionstr


@pytest.mark.slow
def test_the_wheel_declares_edge_agent_and_the_device_dependencies_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(_dist_info(names, "entry_points.txt")).decode()
        metadata = Parser().parsestr(z.read(_dist_info(names, "METADATA")).decode())
    root = _toml(ROOT / "pyproject.toml")["project"]
    eps = _EntryPoints(delimiters=("=",))
    eps.read_string(entry_points)
    assert eps.sections() == ["console_scripts"]
    assert dict(eps["console_scripts"]) == {"edge-agent": root["scripts"]["edge-agent"]}
    assert "cloud-hub" not in entry_points and "cloud_hub" not in entry_points

    assert metadata["Name"] == "edgeml-agent" and metadata["Version"] == root["version"]
    requires = metadata.get_all("Requires-Dist") or []
    base = [r for r in requires if "extra ==" not in r]
    assert _reqs(base) == _reqs(root["dependencies"])
    assert metadata.get_all("Provides-Extra") == ["agent-metrics"]
    assert not {canonicalize_name(Requirement(r).name) for r in requires} & HUB_ONLY


_PROBE = r"""
import importlib, importlib.metadata, json, pkgutil, sys
import edge_agent
try:
    import cloud_hub
    hub = cloud_hub.__file__ or repr(cloud_hub.__path__)
except ModuleNotFoundError:
    hub = None
modules = [m.name for m in pkgutil.walk_packages(edge_agent.__path__, "edge_agent.")
           if not m.name.endswith("__main__")]
for name in modules:
    importlib.import_module(name)
print(json.dumps({"edge_agent": edge_agent.__file__, "hub": hub, "modules": len(modules),
                  "hub_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "cloud_hub"),
                  "dist": importlib.metadata.version("edgeml-agent")}))
"""


@pytest.mark.slow
def test_the_installed_wheel_runs_the_agent_without_the_hub(wheel: Path, tmp_path: Path) -> None:
    """A venv of its own, no system site-packages: the wheel installed, and the third-party device
    dependencies taken from this interpreter's site-packages through a .pth file (read after the
    venv's own site-packages, and never a site dir: the editable install's finder there stays off)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                          "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    assert site.is_relative_to(venv)
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_device_deps.pth").write_text("".join(f"{p}\n" for p in deps))

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "COLUMNS": "200", "HOME": str(tmp_path)}

    def run(*args: Path | str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, env=env,
                              cwd=tmp_path)

    agent = venv / "bin" / "edge-agent"
    assert agent.exists() and not (venv / "bin" / "cloud-hub").exists()
    helped = run(agent, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "run" in helped.stdout and "replay" in helped.stdout
    version = run(agent, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"edge-agent {_toml(ROOT / 'pyproject.toml')['project']['version']}"

    probe = run(python, "-c", _PROBE)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert Path(found["edge_agent"]).is_relative_to(venv), f"edge_agent imported from {found['edge_agent']}"
    assert found["hub"] is None, f"cloud_hub is importable on the device: {found['hub']}"
    assert found["hub_loaded"] == [], "importing every edge_agent module loaded cloud_hub"
    assert found["modules"] >= 30
    assert found["dist"] == _toml(ROOT / "pyproject.toml")["project"]["version"]
