"""A service server's record of the files it imported: a file written while the import
runs must count as changed, or the server would serve its old code as the new."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from soafarm.config import Settings, load_settings
from soafarm.workers.warm import CHANGED_WHILE_IMPORTING, _import_service

DAY_NS = 86_400 * 10**9

# On import, the module rewrites itself, as an editor saving a new version would while a
# fork server is still importing the old one.
SELF_WRITING = """
from pathlib import Path
VERSION = "v1"
Path(__file__).write_text(Path(__file__).read_text().replace('"v1"', '"v2"', 1))


class Probe:
    def __init__(self, context):
        pass
"""

STILL = """
class Probe:
    def __init__(self, context):
        pass
"""


@pytest.fixture
def channel() -> Iterator[socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours
    ours.close()
    theirs.close()


def settings_for(folder: Path, monkeypatch: pytest.MonkeyPatch, module: str) -> Settings:
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return load_settings(environ={}).replace(service_registration_path=(folder,))


def write(folder: Path, name: str, code: str, age_ns: int) -> Path:
    module = folder / f"{name}.py"
    module.write_text(code)
    (folder / f"{name}.toml").write_text(f'entry_point = "{name}:Probe"\n')
    for path in (module, folder / f"{name}.toml", folder):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - age_ns))
    return module


def import_watching(
    folder: Path, monkeypatch: pytest.MonkeyPatch, channel: socket.socket, name: str, code: str
) -> tuple[Path, dict[str, int]]:
    """Write service `name` (a day old) and import it as a service server does: its module
    and the mtimes it watches."""
    module = write(folder, name, code, age_ns=DAY_NS)
    settings = settings_for(folder, monkeypatch, name)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    imported = _import_service(settings, name, None, channel)
    assert imported is not None
    return module, imported[1]


def test_a_file_written_while_importing_counts_as_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channel: socket.socket
) -> None:
    module, watched = import_watching(
        tmp_path, monkeypatch, channel, "selfwriting_svc", SELF_WRITING
    )
    assert sys.modules["selfwriting_svc"].VERSION == "v1"
    assert 'VERSION = "v2"' in module.read_text()
    # without the mark, the server would record v2's mtime and serve v1 as current
    assert watched[str(module)] == CHANGED_WHILE_IMPORTING
    assert watched[str(tmp_path / "selfwriting_svc.toml")] == (
        (tmp_path / "selfwriting_svc.toml").stat().st_mtime_ns
    )


def test_files_unchanged_since_before_the_import_keep_their_mtimes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channel: socket.socket
) -> None:
    module, watched = import_watching(tmp_path, monkeypatch, channel, "still_svc", STILL)
    assert watched[str(module)] == module.stat().st_mtime_ns
    assert CHANGED_WHILE_IMPORTING not in watched.values()
