"""The registry: resolves a service name (and optional version) to its registration file."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import soafarm.examples
from soafarm.errors import RegistrationError, ServiceNotFound
from soafarm.registration.schema import Registration, parse_file_name, parse_registration
from soafarm.service import ServiceContext

if TYPE_CHECKING:
    from soafarm.registration.packages import PackageCache

#: The example services shipped inside the package (`soafarm.examples`: echo, faulty) are
#: always found, after the configured folders.
BUILTIN_FOLDER = Path(soafarm.examples.__file__).resolve().parent


@dataclass(frozen=True)
class Problem:
    """A registration file that could not be read (shown by `soafarm services list`)."""

    path: Path
    error: str


class Registry:
    """Registration files found in an ordered list of folders; earlier folders win."""

    def __init__(
        self,
        folders: Iterable[Path],
        include_builtin: bool = True,
        packages: PackageCache | None = None,
    ) -> None:
        """Search the deployed `packages` (if given; soafarm.registration.packages), then
        `folders` in order, then (unless disabled) the built-in examples folder."""
        self.packages = packages
        self.folders = [packages.folder] if packages is not None else []
        self.folders += [Path(f) for f in folders]
        if include_builtin and BUILTIN_FOLDER not in self.folders:
            self.folders.append(BUILTIN_FOLDER)

    def sync(self) -> None:
        """Bring the deployed packages' folder up to date (one Redis read; nothing without
        packages). `scan` and `resolve` do it first."""
        if self.packages is not None:
            self.packages.sync()

    def _files(self) -> Iterator[Path]:
        for folder in self.folders:
            if folder.is_dir():
                yield from sorted(folder.glob("*.toml"))

    def scan(self) -> tuple[list[Registration], list[Problem]]:
        """Every valid registration (first one found per name and version), and the bad files."""
        self.sync()
        found: dict[tuple[str, str | None], Registration] = {}
        problems: list[Problem] = []
        for path in self._files():
            try:
                reg = parse_registration(path)
            except RegistrationError as e:
                problems.append(Problem(path, str(e)))
                continue
            found.setdefault((reg.name, reg.version), reg)
        regs = sorted(found.values(), key=lambda r: (r.name, r.version_key))
        return regs, problems

    def resolve(self, name: str, version: str | None = None) -> Registration:
        """The registration for `name`: the asked version, else unversioned, else the highest.

        Only files named for `name` are parsed, so a broken file of another service does not
        stop this one from resolving.
        """
        self.sync()
        candidates: dict[str | None, Path] = {}
        for path in self._files():
            try:
                file_name, file_version = parse_file_name(path)
            except RegistrationError:
                continue
            if file_name == name:
                candidates.setdefault(file_version, path)
        if not candidates:
            known = sorted({r.name for r in self.scan()[0]})
            where = ", ".join(str(f) for f in self.folders)
            raise ServiceNotFound(
                f"unknown service {name!r}; registered: {', '.join(known) or 'none'} "
                f"(searched {where}; add folders with SOAFARM_SERVICE_REGISTRATION_PATH)"
            )
        if version is not None:
            if version not in candidates:
                have = ", ".join(sorted(v for v in candidates if v is not None)) or "none"
                raise ServiceNotFound(
                    f"service {name!r} has no version {version}; versions available: {have}"
                )
            return parse_registration(candidates[version])
        if None in candidates:
            return parse_registration(candidates[None])
        newest = max(
            (v for v in candidates if v is not None),
            key=lambda v: tuple(int(x) for x in v.split(".")),
        )
        return parse_registration(candidates[newest])


def load_service_class(registration: Registration) -> type:
    """Import the registration's `module:Class`, with its python_path first on sys.path."""
    for folder in reversed(registration.python_path):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    module_name, _, class_name = registration.entry_point.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise RegistrationError(
            f"{registration.path}: cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from e
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise RegistrationError(
            f"{registration.path}: module {module_name!r} has no class {class_name!r}"
        )
    return cls


def service_context(
    registration: Registration,
    session_id: int,
    host_name: str,
    instance_id: str,
    data_loader: Callable[[str], Any],
) -> ServiceContext:
    """The context a service of `registration` is constructed with in an instance."""
    return ServiceContext(
        session_id=session_id,
        host_name=host_name,
        instance_id=instance_id,
        service_name=registration.name,
        service_version=registration.version,
        environment=dict(registration.environment),
        data_loader=data_loader,
    )
