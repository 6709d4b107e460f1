"""`soafarm services deploy|remove`: service packages kept in the farm, which every worker
host fetches and caches by content hash (soafarm.registration.packages)."""

from __future__ import annotations

from pathlib import Path

import click

from soafarm.cli import with_settings
from soafarm.cli.info import services
from soafarm.config import Settings
from soafarm.errors import ServiceNotFound
from soafarm.names import Names
from soafarm.registration.packages import checked_version, make_package
from soafarm.registration.schema import parse_file_name
from soafarm.state.packages import PackageStore
from soafarm.transport.connections import redis_client
from soafarm.transport.identity import own_user


@services.command("deploy")
@with_settings
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--version",
    default=None,
    help="Deploy as this version (<major>.<minor>): renames the registration file.",
)
def services_deploy(settings: Settings, source: Path, version: str | None) -> None:
    """Store the service package SOURCE (a folder or a zip: one <service>.toml at its top,
    and its code) in the farm. Worker hosts fetch it before their next instance of the
    service, on any machine; it replaces a package deployed under the same name and
    version, and takes precedence over the registration folders."""
    package = make_package(source, version, settings.max_package_bytes)
    client = redis_client(settings)
    try:
        record = package.record(own_user(settings))
        PackageStore(client, Names(settings.namespace)).deploy(record, package.blob)
    finally:
        client.close()
    click.echo(
        f"deployed {record.label} ({record.files} files, {record.size:,} bytes, "
        f"sha256 {record.sha256[:12]}) to namespace {settings.namespace}"
    )


@services.command("remove")
@with_settings
@click.argument("service")
@click.option("--version", default=None, help="The version to remove (<major>.<minor>).")
def services_remove(settings: Settings, service: str, version: str | None) -> None:
    """Remove the package of SERVICE (unversioned, or --version) from the farm. Instances
    running it finish; new sessions resolve the service from what is left."""
    version = checked_version(version) if version is not None else None
    registration = f"{service}_{version}.toml" if version else f"{service}.toml"
    parse_file_name(Path(registration))  # a bad name is a one-line error
    client = redis_client(settings)
    try:
        store = PackageStore(client, Names(settings.namespace))
        removed = store.remove(registration)
        if removed is None:
            deployed = sorted(r.label for r in store.records().values())
            raise ServiceNotFound(
                f"no package of {service}{' ' + version if version else ''} is deployed in "
                f"namespace {settings.namespace}; deployed: {', '.join(deployed) or 'none'}"
            )
    finally:
        client.close()
    click.echo(f"removed {removed.label} (sha256 {removed.sha256[:12]})")
