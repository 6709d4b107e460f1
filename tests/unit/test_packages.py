"""Service packages: made from a folder or a zip (one registration file, safe names, size
limits), deployed and removed in an in-memory Redis, and unpacked into a machine's cache by
content hash, with the registry finding the code beside the real registration file."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest
import redis
import structlog.testing

from soafarm.errors import PackageError, RegistrationError
from soafarm.registration import Registry
from soafarm.registration.packages import PackageCache, make_package
from soafarm.registration.registry import load_service_class
from soafarm.state.packages import PackageStore, sha256_of
from tests.unit.fakes import NAMES

TOML = 'entry_point = "pricer:Pricer"\n'
CODE = 'VERSION = "{v}"\n\nclass Pricer:\n    def __init__(self, context):\n        pass\n'


def source(folder: Path, version: str = "v1", name: str = "pricer.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(TOML)
    (folder / "pricer.py").write_text(CODE.format(v=version))
    (folder / "lib").mkdir(exist_ok=True)
    (folder / "lib" / "helper.py").write_text("X = 1\n")
    (folder / "__pycache__").mkdir(exist_ok=True)
    (folder / "__pycache__" / "pricer.cpython-311.pyc").write_bytes(b"\0junk")
    return folder


def zip_of(entries: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return out.getvalue()


def test_a_folder_makes_the_same_zip_every_time_without_caches(tmp_path: Path) -> None:
    folder = source(tmp_path / "src")
    first = make_package(folder, None, 2**20)
    os.utime(folder / "pricer.py", (1, 1))  # times are not part of the package
    again = make_package(folder, None, 2**20)
    assert first.blob == again.blob
    assert (first.service, first.version, first.registration) == ("pricer", None, "pricer.toml")
    names = zipfile.ZipFile(io.BytesIO(first.blob)).namelist()
    assert sorted(names) == ["lib/helper.py", "pricer.py", "pricer.toml"]
    assert first.files == 3


def test_version_renames_the_registration_file(tmp_path: Path) -> None:
    package = make_package(source(tmp_path / "src"), "1.2", 2**20)
    assert (package.registration, package.version) == ("pricer_1.2.toml", "1.2")
    assert "pricer_1.2.toml" in zipfile.ZipFile(io.BytesIO(package.blob)).namelist()
    with pytest.raises(PackageError, match=r"is not <major>\.<minor>"):
        make_package(source(tmp_path / "src"), "latest", 2**20)


@pytest.mark.parametrize(
    ("entries", "links", "why"),
    [
        ({"a.toml": TOML.encode(), "../evil.py": b""}, (), "outside the package"),
        ({"a.toml": TOML.encode(), "/etc/cron.d/x": b""}, (), "outside the package"),
        ({"a.toml": TOML.encode()}, ("pricer.py",), "is a symlink"),
        ({"a.toml": TOML.encode(), "b.toml": TOML.encode()}, (), "exactly one registration"),
        ({"sub/a.toml": TOML.encode()}, (), "exactly one registration"),
        ({"a.toml": b"entry_point = 3\n"}, (), "entry_point"),
    ],
)
def test_a_bad_zip_is_refused_naming_the_problem(
    tmp_path: Path, entries: dict[str, bytes], links: tuple[str, ...], why: str
) -> None:
    path = tmp_path / "package.zip"
    path.write_bytes(zip_of(entries, links))
    with pytest.raises(RegistrationError, match=why):
        make_package(path, None, 2**20)


def test_size_limits_refuse_a_large_package_and_a_zip_bomb(tmp_path: Path) -> None:
    folder = source(tmp_path / "src")
    (folder / "data.bin").write_bytes(os.urandom(50_000))
    with pytest.raises(PackageError, match="over max_package_bytes"):
        make_package(folder, None, 10_000)
    bomb = tmp_path / "bomb.zip"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pricer.toml", TOML)
        archive.writestr("zeros", b"\0" * 50 * 2**20)
    bomb.write_bytes(out.getvalue())
    with pytest.raises(PackageError, match="zip bomb"):
        make_package(bomb, None, 64 * 2**20)


def test_a_missing_or_foreign_source_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no such folder or zip file"):
        make_package(tmp_path / "nowhere", None, 2**20)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PackageError, match="not a folder or a zip file"):
        make_package(tmp_path / "notes.txt", None, 2**20)


def cache(r: redis.Redis, root: Path) -> tuple[PackageStore, Registry]:
    store = PackageStore(r, NAMES)
    return store, Registry([], packages=PackageCache(store, root, 2**20))


def test_a_deployed_package_resolves_from_the_cache_with_its_code(
    r: redis.Redis, tmp_path: Path
) -> None:
    store, registry = cache(r, tmp_path / "cache")
    package = make_package(source(tmp_path / "src"), None, 2**20)
    store.deploy(package.record("alice"), package.blob)
    registration = registry.resolve("pricer")
    assert registration.path.parent == tmp_path / "cache" / "pkg" / sha256_of(package.blob)
    assert registration.python_path == (registration.path.parent,)
    assert load_service_class(registration).__name__ == "Pricer"
    (record,) = store.records().values()
    assert (record.deployed_by, record.size, record.files) == ("alice", len(package.blob), 3)


def test_a_redeploy_relinks_and_a_removal_unlinks_and_frees_the_zip(
    r: redis.Redis, tmp_path: Path
) -> None:
    store, registry = cache(r, tmp_path / "cache")
    v1 = make_package(source(tmp_path / "v1", "v1"), None, 2**20)
    v2 = make_package(source(tmp_path / "v2", "v2"), None, 2**20)
    store.deploy(v1.record("alice"), v1.blob)
    assert registry.resolve("pricer").path.parent.name == sha256_of(v1.blob)
    store.deploy(v2.record("alice"), v2.blob)
    assert registry.resolve("pricer").path.parent.name == sha256_of(v2.blob)
    assert store.blob(sha256_of(v1.blob)) is None  # named by no record any more
    removed = store.remove("pricer.toml")
    assert removed is not None and removed.sha256 == sha256_of(v2.blob)
    assert store.blob(sha256_of(v2.blob)) is None
    assert store.remove("pricer.toml") is None
    registry.sync()
    assert list((tmp_path / "cache" / "registrations").iterdir()) == []


def test_a_zip_shared_by_two_versions_stays_until_the_last_goes(
    r: redis.Redis, tmp_path: Path
) -> None:
    store, _ = cache(r, tmp_path / "cache")
    package = make_package(source(tmp_path / "src"), None, 2**20)
    other = package.record("alice")
    store.deploy(other, package.blob)
    store.deploy(type(other)(**{**other.__dict__, "registration": "copy.toml"}), package.blob)
    store.remove("pricer.toml")
    assert store.blob(other.sha256) == package.blob
    store.remove("copy.toml")
    assert store.blob(other.sha256) is None


def test_a_tampered_zip_is_not_unpacked(r: redis.Redis, tmp_path: Path) -> None:
    store, registry = cache(r, tmp_path / "cache")
    package = make_package(source(tmp_path / "src"), None, 2**20)
    record = package.record("alice")
    store.deploy(record, package.blob)
    r.set(NAMES.package_blob_key(record.sha256), zip_of({"pricer.toml": b"x"}))
    with pytest.raises(RegistrationError, match="unknown service 'pricer'"):
        registry.resolve("pricer")
    assert not (tmp_path / "cache" / "pkg" / record.sha256).exists()


def test_nothing_deployed_makes_no_cache_folder(r: redis.Redis, tmp_path: Path) -> None:
    _, registry = cache(r, tmp_path / "cache")
    assert registry.resolve("echo").name == "echo"  # the built-in examples still resolve
    assert not (tmp_path / "cache").exists()


def test_a_zip_of_a_folder_makes_the_same_package_as_the_folder(tmp_path: Path) -> None:
    folder = source(tmp_path / "src")
    archive = tmp_path / "pricer.zip"
    with zipfile.ZipFile(archive, "w") as out:  # as `zip -r` makes it: folders listed too
        for path in sorted(folder.rglob("*")):
            out.write(path, path.relative_to(folder).as_posix())
    # the same files, the same package: caches are left out of a zip too
    assert make_package(archive, None, 2**20).blob == make_package(folder, None, 2**20).blob


def test_a_cache_that_cannot_be_written_is_logged_and_the_folders_still_resolve(
    r: redis.Redis, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    store, registry = cache(r, tmp_path / "a-file" / "cache")
    package = make_package(source(tmp_path / "src"), None, 2**20)
    store.deploy(package.record("alice"), package.blob)
    with structlog.testing.capture_logs() as logs:
        assert registry.resolve("echo").name == "echo"
        with pytest.raises(RegistrationError, match="unknown service 'pricer'"):
            registry.resolve("pricer")
    (warning, *_) = [e for e in logs if e["event"] == "packages_not_synced"]
    assert "SOAFARM_PACKAGE_CACHE" in warning["fix"]
