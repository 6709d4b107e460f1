"""Commands that read local configuration: `config show`, `services list|validate`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json, emit_table
from soafarm.config import Settings
from soafarm.errors import ConnectionFailed, RegistrationError
from soafarm.logs import say
from soafarm.names import Names
from soafarm.plain import to_plain


@cli.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command("show")
@with_settings
def config_show(settings: Settings) -> None:
    """Print every setting after file, environment and options (passwords masked), as JSON."""
    # as the settings file spells them (0 for "no limit"; TOML has no null), not `present`ed
    emit_json(settings.as_dict(), raw=True)


@cli.group()
def services() -> None:
    """List and validate service registration files."""


@services.command("list")
@with_settings
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def services_list(settings: Settings, as_json: bool) -> None:
    """List registered services (name, version, entry point, where from): the packages
    deployed to the farm, then the registration folders' files; and broken files."""
    import redis

    from soafarm.registration import Registry
    from soafarm.registration.packages import farm_registry
    from soafarm.state.packages import PackageRecord, PackageStore
    from soafarm.transport.connections import redis_client

    deployed: dict[str, PackageRecord] = {}  # by SHA-256, the name of its cache folder
    try:
        client = redis_client(settings)
        try:
            records = PackageStore(client, Names(settings.namespace)).records()
            deployed = {r.sha256: r for r in records.values()}
            regs, problems = farm_registry(settings, client).scan()
        finally:
            client.close()
    except (ConnectionFailed, redis.RedisError) as e:  # the folders are still worth listing
        # a fenced user's account may not read the farm's keys; Redis may be down
        say("packages_unlisted", f"deployed packages not listed: {e}", "warning")
        deployed = {}
        regs, problems = Registry(settings.service_registration_path).scan()

    def source(path: Path) -> str:
        record = deployed.get(path.parent.name)
        if record is None:
            return str(path)
        return f"deployed {record.sha256[:12]} by {record.deployed_by}"

    if as_json:
        emit_json(
            {
                "services": [
                    {
                        **dataclasses.asdict(r),
                        "path": str(r.path),
                        "python_path": [str(p) for p in r.python_path],
                        "deployed": (
                            to_plain(deployed[r.path.parent.name])
                            if r.path.parent.name in deployed
                            else None
                        ),
                    }
                    for r in regs
                ],
                "problems": [{"path": str(p.path), "error": p.error} for p in problems],
            }
        )
        return
    emit_table(
        "Registered services",
        ["name", "version", "entry point", "from"],
        [(r.name, r.version or "-", r.entry_point, source(r.path)) for r in regs],
    )
    for p in problems:
        say("invalid_registration", f"invalid: {p.error}", "warning", path=str(p.path))


@services.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def services_validate(files: tuple[Path, ...]) -> None:
    """Check registration files; exit 1 with one line per problem if any is invalid."""
    from soafarm.registration import parse_registration

    bad = 0
    for path in files:
        try:
            reg = parse_registration(path)
        except RegistrationError as e:
            say("invalid_registration", f"invalid: {e}", "warning", path=str(path))
            bad += 1
        else:
            click.echo(f"ok: {path}: service {reg.label} -> {reg.entry_point}")
    if bad:
        raise RegistrationError(f"{bad} of {len(files)} registration file(s) invalid")
