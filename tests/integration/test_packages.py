"""Service packages (issue 19): `soafarm services deploy` stores a service in the farm, and a
worker host on another machine (a network namespace of its own, tests.netns) with no copy of
the code fetches it, caches it by content hash and serves it; a redeploy is served at the
next session, a removal makes the service unknown; bad packages are one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.errors import ServiceNotFound
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.transport.connections import redis_client
from tests.conftest import cli_env
from tests.netns import other_machine, servers_seen_from

pytestmark = pytest.mark.integration

TOML = 'entry_point = "pricer:Pricer"\ndescription = "deployed, not on any host"\n'
CODE = """
from soafarm.service import ServiceContext

VERSION = "{version}"


class Pricer:
    def __init__(self, context: ServiceContext) -> None:
        self.context = context

    def price(self, x: float) -> dict:
        return {{"price": 2 * x, "version": VERSION, "file": __file__}}
"""


def package_folder(where: Path, version: str) -> Path:
    where.mkdir(parents=True)
    (where / "pricer.toml").write_text(TOML)
    (where / "pricer.py").write_text(CODE.format(version=version))
    return where


def soafarm(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "soafarm", *args],
        env={**cli_env(settings), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def price(settings: Settings) -> dict[str, Any]:
    with (
        Session.create(SessionStartInfo("pricer"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("price", 21.0)
        (response,) = list(client.get_responses(timeout=60))
        result: dict[str, Any] = response.result
        return result


def test_a_host_on_another_machine_serves_a_deployed_service_it_has_no_copy_of(
    settings: Settings, tmp_path: Path
) -> None:
    source = package_folder(tmp_path / "v1", "v1")
    deployed = soafarm(settings, "services", "deploy", str(source))
    assert deployed.returncode == 0, deployed.stderr
    assert deployed.stdout.startswith("deployed pricer (2 files")
    shutil.rmtree(source)  # from here on the code is only in the farm
    far_cache = tmp_path / "far-cache"
    with (
        other_machine() as machine,
        servers_seen_from(machine, settings) as env,
        LocalFarm(settings, workers=0) as farm,
    ):
        farm.add_worker(
            "far-host",
            cores=2,
            env={
                **env,
                "SOAFARM_SERVICE_REGISTRATION_PATH": str(tmp_path / "empty"),
                "SOAFARM_PACKAGE_CACHE": str(far_cache),
            },
            prefix=tuple(machine.prefix),
        )
        first = price(settings)
        assert (first["price"], first["version"]) == (42.0, "v1")
        # imported from the far host's own cache: the code came to it through the farm
        assert first["file"].startswith(str(far_cache / settings.namespace / "pkg"))

        # a new version of the code, deployed under the same name: the next session gets it
        v2 = package_folder(tmp_path / "v2", "v2")
        assert soafarm(settings, "services", "deploy", str(v2)).returncode == 0
        assert price(settings)["version"] == "v2"
        listed = soafarm(settings, "services", "list")
        (row,) = [line for line in listed.stdout.splitlines() if line.startswith("pricer")]
        assert "deployed" in row

        removed = soafarm(settings, "services", "remove", "pricer")
        assert removed.returncode == 0 and removed.stdout.startswith("removed pricer")
        with pytest.raises(ServiceNotFound, match="unknown service 'pricer'"):
            Session.create(SessionStartInfo("pricer"), settings)
    client = redis_client(settings)
    try:  # nothing left in Redis: the index and both zips are gone
        names = Names(settings.namespace)
        assert client.hlen(names.packages_key) == 0
        assert client.keys(names.package_blob_key("*")) == []
    finally:
        client.close()


def test_bad_packages_are_one_line_errors_and_deploy_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    big = package_folder(tmp_path / "big", "v1")
    (big / "data.bin").write_bytes(os.urandom(100_000))  # does not compress
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("pricer.toml", TOML)
        archive.writestr("../../outside.py", "print('escaped')\n")
    cases = [
        (("services", "deploy", str(big)), {"SOAFARM_MAX_PACKAGE_BYTES": "20000"}, "over max"),
        (("services", "deploy", str(evil)), {}, "would land outside the package"),
        (("services", "deploy", str(tmp_path / "nowhere")), {}, "no such folder or zip"),
        (("services", "deploy", str(big), "--version", "two"), {}, "is not <major>.<minor>"),
        (("services", "remove", "pricer"), {}, "no package of pricer is deployed"),
    ]
    for args, env, why in cases:
        done = soafarm(settings, *args, **env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, (args, done.stderr)
        assert len(lines) == 1 and why in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr
    client = redis_client(settings)
    try:
        assert client.hlen(Names(settings.namespace).packages_key) == 0
    finally:
        client.close()
