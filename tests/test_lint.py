"""The code style promises (ruff, mypy --strict) are checked with the suite, not by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_ruff_is_clean() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_sees_the_installed_package(tmp_path: Path) -> None:
    """A user's own code type-checks against soafarm from the README's editable install."""
    user = tmp_path / "user.py"
    user.write_text(
        "from soafarm import BrokerClient\n"
        "from soafarm.broker.store import BrokerStore\n"
        "from soafarm.workers.instance import InstanceSpec\n"
        "reveal_type(BrokerStore)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "soafarm.broker.store.BrokerStore" in result.stdout
