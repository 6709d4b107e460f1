"""The package's rooms import only downwards: core < transport < state < registration <
client, broker, workers (which never import each other) < local < cli."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "soafarm"

#: Room of each first-level name under soafarm; anything not listed is core (level 0).
LEVELS = {
    "transport": 1,
    "state": 2,
    "registration": 3,
    "client": 4,
    "broker": 4,
    "workers": 4,
    "local": 5,
    "cli": 6,
}
FACADES = {"soafarm", "soafarm.__main__"}  # re-export the public API from every room


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVELS else "core"


def level(module: str) -> int:
    return LEVELS.get(room(module), 0)


def modules() -> list[tuple[str, Path]]:
    found = []
    # broker/, workers/, ... are symlinks inside soafarm/: follow them
    paths = [Path(d, f) for d, _, fs in os.walk(PACKAGE, followlinks=True) for f in fs]
    for path in sorted(p for p in paths if p.suffix == ".py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = ["soafarm", *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        found.append((".".join(parts), path))
    return found


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m == "soafarm" or m.startswith("soafarm.")}


def test_every_room_is_found() -> None:
    assert {room(m) for m, _ in modules()} == {"core", *LEVELS}


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_go_down_only(module: str, path: Path) -> None:
    if module in FACADES:
        return
    bad = sorted(
        m
        for m in imports_of(path)
        if level(m) > level(module) or (level(m) == level(module) and room(m) != room(module))
    )
    assert not bad, f"{module} ({room(module)}) imports a room above or beside its own: {bad}"


def test_installed_package_has_one_namespace(tmp_path: Path) -> None:
    """Outside the checkout, the rooms import as soafarm.*, and nothing generic is installed."""
    probe = (
        "import importlib.util as u\n"
        "names = ('broker', 'workers', 'registration', 'examples')\n"
        "generic = [n for n in names if u.find_spec(n)]\n"
        "import soafarm.broker.daemon, soafarm.workers.instance, soafarm.registration\n"
        "from soafarm.registration.registry import BUILTIN_FOLDER\n"
        "assert (BUILTIN_FOLDER / 'echo.toml').is_file(), BUILTIN_FOLDER\n"
        "print(generic)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
