"""Service packages on disk: made from a folder or a zip for `soafarm services deploy`, and
unpacked into a cache on every machine that resolves services (worker hosts, broker daemons),
so a host serves a deployed service without a copy of its own.

The cache of a namespace (`package_cache`, by default `~/.cache/soafarm/packages/<ns>`) holds
`pkg/<sha256>/`, each package unpacked once by content hash, and `registrations/`, one symlink
per deployed registration file into its package. The registry searches `registrations/`
before the configured folders; a registration's `python_path` is relative to the real file,
so the code next to it is imported. `sync()` makes the links match what Redis says is
deployed: a redeploy changes a link (and the folder's modification time, which warm servers
watch), a removal drops it. Unpacked packages stay (content never changes under a hash).
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import redis
import structlog

from soafarm.config import Settings
from soafarm.errors import PackageError
from soafarm.names import Names
from soafarm.registration.registry import Registry
from soafarm.registration.schema import parse_file_name, parse_registration
from soafarm.state.packages import PackageRecord, PackageStore, sha256_of
from soafarm.transport.errors import REDIS_LOST

log = structlog.get_logger(__name__)

#: Unpacked, a package may be at most this many times its zip's size (a zip bomb is refused).
MAX_EXPANSION = 20
#: Folders and files never packed from a folder.
SKIPPED = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".venv"}
#: A fixed time for every packed file, so the same files make the same zip (and hash).
ZIP_TIME = (2000, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Package:
    """A package ready to deploy: its zip and what it registers."""

    blob: bytes
    registration: str
    service: str
    version: str | None
    files: int

    def record(self, deployed_by: str) -> PackageRecord:
        """The record `soafarm services list` shows for it once deployed."""
        return PackageRecord(
            registration=self.registration,
            service=self.service,
            version=self.version,
            sha256=sha256_of(self.blob),
            size=len(self.blob),
            files=self.files,
            deployed=time.time(),
            deployed_by=deployed_by,
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _members(source: Path) -> list[tuple[str, bytes]]:
    """(relative POSIX path, content) of each file of folder or zip `source`."""
    if source.is_dir():
        out = []
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if _skipped(relative.parts):
                continue
            if path.is_symlink():
                raise PackageError(f"{path}: a package holds no symlinks; copy the file in")
            if path.is_file():
                out.append((relative.as_posix(), path.read_bytes()))
        return out
    if not zipfile.is_zipfile(source):
        raise PackageError(f"{source}: not a folder or a zip file")
    with zipfile.ZipFile(source) as archive:
        entries = _safe_entries(archive, source.stat().st_size)
    return [(name, data) for name, data in entries if not _skipped(name.split("/"))]


def _skipped(parts: tuple[str, ...] | list[str]) -> bool:
    """Caches and version control, left out of a package however it is given."""
    return any(part in SKIPPED for part in parts) or parts[-1].endswith(".pyc")


def _safe_entries(archive: zipfile.ZipFile, size: int) -> list[tuple[str, bytes]]:
    """Each file of `archive` (of `size` bytes) with a safe relative name; a name leaving
    the package, a link or a zip bomb is refused."""
    total = sum(info.file_size for info in archive.infolist())
    if total > MAX_EXPANSION * max(size, 2**20):
        raise PackageError(f"the package unpacks to {_mib(total)}: refused as a zip bomb")
    out = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename or not name.parts:
            raise PackageError(f"package entry {info.filename!r} would land outside the package")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise PackageError(f"package entry {info.filename!r} is a symlink")
        out.append((name.as_posix(), archive.read(info)))
    return out


def checked_version(version: str) -> str:
    """`version` if it is <major>.<minor>, as registration file names spell versions."""
    if not re.fullmatch(r"\d+\.\d+", version):
        raise PackageError(f"--version {version!r} is not <major>.<minor> (for example 1.2)")
    return version


def make_package(source: Path, version: str | None, max_bytes: int) -> Package:
    """The package of folder or zip `source`: its one top-level registration file
    (`<service>[_<version>].toml`) and every other file. `version` renames that file to
    `<service>_<version>.toml`. Raises PackageError, naming what is wrong."""
    if not source.exists():
        raise PackageError(f"{source}: no such folder or zip file")
    members = _members(source)
    tomls = [name for name, _ in members if "/" not in name and name.endswith(".toml")]
    if len(tomls) != 1:
        found = ", ".join(tomls) or "none"
        raise PackageError(
            f"{source}: a package holds exactly one registration file at its top "
            f"(<service>.toml or <service>_<major>.<minor>.toml); found {found}"
        )
    (registration,) = tomls
    service, file_version = parse_file_name(Path(registration))
    if version is not None:
        renamed = f"{service}_{checked_version(version)}.toml"
        members = [(renamed if n == registration else n, d) for n, d in members]
        registration, file_version = renamed, version
    blob = _zip(members)
    if len(blob) > max_bytes:
        raise PackageError(
            f"{source}: the package is {_mib(len(blob))}, over max_package_bytes "
            f"({_mib(max_bytes)}); leave data out of it (common data is for data), or raise "
            "max_package_bytes"
        )
    # the registration must be valid where it will be read: unpacked on its own
    with tempfile.TemporaryDirectory(prefix="soafarm-package-") as folder:
        _unpack(blob, Path(folder))
        parse_registration(Path(folder) / registration)
    return Package(blob, registration, service, file_version, len(members))


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(members):
            info = zipfile.ZipInfo(name, ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return out.getvalue()


def _unpack(blob: bytes, folder: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        for name, data in _safe_entries(archive, len(blob)):
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def cache_root(settings: Settings) -> Path:
    """The package cache of `settings`' namespace."""
    if settings.package_cache:
        base = Path(settings.package_cache).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "soafarm" / "packages"
    return base / settings.namespace


class PackageCache:
    """One machine's unpacked copies of a namespace's deployed packages."""

    def __init__(self, store: PackageStore, root: Path, max_bytes: int) -> None:
        """Keep them under `root`; refuse a zip over `max_bytes` (as deploy does)."""
        self.store = store
        self.root = root
        self.max_bytes = max_bytes
        #: The folder of links the registry searches first.
        self.folder = root / "registrations"

    def sync(self) -> None:
        """Make `folder` match what is deployed now, fetching and unpacking what is new.
        Redis not answering, or a cache folder that cannot be written, leaves the links of
        the last sync (logged): the services of the registration folders still resolve."""
        try:
            self._sync()
        except REDIS_LOST as e:
            log.warning("packages_not_synced", error=f"{type(e).__name__}: {e}")
        except OSError as e:
            log.warning(
                "packages_not_synced",
                error=f"{type(e).__name__}: {e}",
                fix="point package_cache (SOAFARM_PACKAGE_CACHE) at a folder this user may write",
            )

    def _sync(self) -> None:
        records = self.store.records()
        if not records and not self.folder.is_dir():
            return  # nothing deployed, ever: no cache folder for each namespace used
        self.folder.mkdir(parents=True, exist_ok=True)
        wanted: dict[str, Path] = {}
        for name, record in records.items():
            unpacked = self._unpacked(record)
            if unpacked is not None:
                wanted[name] = unpacked / record.registration
        for link in self.folder.iterdir():
            if link.name not in wanted and not link.name.startswith("."):
                link.unlink(missing_ok=True)
        for name, target in wanted.items():
            link = self.folder / name
            relative = os.path.relpath(target, self.folder)
            if link.is_symlink() and os.readlink(link) == relative:
                continue  # unchanged: the folder's modification time stays
            temporary = self.folder / f".{name}.{secrets.token_hex(4)}"
            temporary.symlink_to(relative)
            os.replace(temporary, link)

    def _unpacked(self, record: PackageRecord) -> Path | None:
        """`pkg/<sha256>`, unpacked from Redis if this machine has not yet; None if the
        package cannot be had (logged: it is then not served from this machine)."""
        folder = self.root / "pkg" / record.sha256
        if folder.is_dir():
            return folder
        blob = self.store.blob(record.sha256)
        why = ""
        if blob is None:
            why = "its zip is gone from Redis (removed meanwhile?)"
        elif len(blob) > self.max_bytes:
            why = f"{_mib(len(blob))} is over max_package_bytes ({_mib(self.max_bytes)})"
        elif sha256_of(blob) != record.sha256:
            why = "its zip does not match its SHA-256"
        if blob is None or why:
            log.warning("package_unusable", package=record.label, why=why)
            return None
        staging = self.root / "pkg" / f".{record.sha256}.{secrets.token_hex(4)}"
        staging.mkdir(parents=True)
        try:
            _unpack(blob, staging)
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # not another process's rename of the same package
                raise
        except (PackageError, zipfile.BadZipFile) as e:
            log.warning("package_unusable", package=record.label, why=str(e))
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("package_fetched", package=record.label, sha256=record.sha256[:12])
        return folder


def farm_registry(settings: Settings, client: redis.Redis) -> Registry:
    """The registry of `settings`' farm: deployed packages (fetched through `client`, the
    farm's Redis account) first, then the configured folders, then the built-in examples."""
    cache = PackageCache(
        PackageStore(client, Names(settings.namespace)),
        cache_root(settings),
        settings.max_package_bytes,
    )
    return Registry(settings.service_registration_path, packages=cache)
