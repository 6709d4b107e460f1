"""The registration file format: its fields, defaults and validation.

A file `<name>.toml` or `<name>_<major>.<minor>.toml` registers one service (version):

    entry_point = "echo:EchoService"          # module:Class, importable from python_path
    python_path = ["."]                       # folders added to sys.path, relative to the file
    max_concurrent_calls = 0                  # 0: capacity follows the resource unit
    service_init_timeout = 60.0               # seconds the constructor may take
    include_exception_detail_in_faults = false
    description = "..."
    [environment]                             # set in the service instance's process
    NAME = "value"
    [broker]                                  # per-service broker settings (see BrokerSettings)
    message_resend_limit = 5
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soafarm.config import BrokerSettings, broker_settings_with, read_toml
from soafarm.errors import ConfigError, RegistrationError

_FILE_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*?)(?:_(?P<version>\d+\.\d+))?\.toml$")
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Registration:
    """One registered service (version), as read from its file."""

    name: str
    version: str | None
    path: Path
    entry_point: str
    python_path: tuple[Path, ...] = ()
    max_concurrent_calls: int = 0
    service_init_timeout: float = 60.0
    include_exception_detail_in_faults: bool = False
    description: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    broker: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """`name` or `name` + ` ` + `version`, for messages and listings."""
        return self.name if self.version is None else f"{self.name} {self.version}"

    @property
    def version_key(self) -> tuple[int, int]:
        """Sortable (major, minor); unversioned sorts lowest."""
        if self.version is None:
            return (-1, -1)
        major, minor = self.version.split(".")
        return (int(major), int(minor))


def parse_file_name(path: Path) -> tuple[str, str | None]:
    """Split a registration file name into service name and version (None if unversioned)."""
    m = _FILE_NAME.match(path.name)
    if m is None:
        raise RegistrationError(
            f"{path}: a registration file is named <name>.toml or <name>_<major>.<minor>.toml"
        )
    return m["name"], m["version"]


# key -> (python type(s), human name)
_TOP_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "entry_point": (str, "string 'module:Class'"),
    "python_path": (list, "list of folder paths"),
    "max_concurrent_calls": (int, "integer >= 0"),
    "service_init_timeout": ((int, float), "number of seconds > 0"),
    "include_exception_detail_in_faults": (bool, "true or false"),
    "description": (str, "string"),
    "environment": (dict, 'table of NAME = "value"'),
    "broker": (dict, "table of broker settings"),
}


def _fail(path: Path, key: str, why: str) -> RegistrationError:
    return RegistrationError(f"{path}: {key}: {why}")


def parse_registration(path: Path) -> Registration:
    """Read and validate one registration file; every problem names the file and the key."""
    name, version = parse_file_name(path)
    try:
        data = read_toml(path)
    except ConfigError as e:
        raise RegistrationError(str(e)) from None
    for key, value in data.items():
        if key not in _TOP_KEYS:
            raise _fail(path, key, f"unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")
        kinds, human = _TOP_KEYS[key]
        if (isinstance(value, bool) and kinds is not bool) or not isinstance(value, kinds):
            raise _fail(path, key, f"expected {human}, got {value!r}")
    if "entry_point" not in data:
        raise _fail(path, "entry_point", "missing; give the service class as 'module:Class'")
    entry_point = data["entry_point"]
    if not _ENTRY_POINT.match(entry_point):
        raise _fail(path, "entry_point", f"expected 'module:Class', got {entry_point!r}")
    if data.get("max_concurrent_calls", 0) < 0:
        raise _fail(path, "max_concurrent_calls", "must be >= 0")
    if data.get("service_init_timeout", 60.0) <= 0:
        raise _fail(path, "service_init_timeout", "must be > 0")
    environment = data.get("environment", {})
    for k, v in environment.items():
        if not isinstance(v, str):
            raise _fail(path, f"environment.{k}", f"expected a string, got {v!r}")
    broker = data.get("broker", {})
    try:
        broker_settings_with(BrokerSettings(), broker, f"{path} [broker]")
    except ConfigError as e:
        raise RegistrationError(str(e)) from None
    folder = path.resolve().parent  # a symlinked file's code is beside the real file
    python_path = tuple(folder / str(p) for p in data.get("python_path", ["."]))
    return Registration(
        name=name,
        version=version,
        path=path.resolve(),
        entry_point=entry_point,
        python_path=python_path,
        max_concurrent_calls=data.get("max_concurrent_calls", 0),
        service_init_timeout=float(data.get("service_init_timeout", 60.0)),
        include_exception_detail_in_faults=data.get("include_exception_detail_in_faults", False),
        description=data.get("description", ""),
        environment=dict(environment),
        broker=dict(broker),
    )
