"""The `soafarm` command line: a click group whose commands share connection options.

Every command accepts `--config`, `--amqp-url`, `--redis-url` and `--namespace` (also read from
`SOAFARM_CONFIG`, `SOAFARM_AMQP_URL`, `SOAFARM_REDIS_URL`, `SOAFARM_NAMESPACE`). A
`SoafarmError` is printed as one line on stderr and exits with its documented code; see
docs/cli.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from soafarm.config import Settings, load_settings
from soafarm.errors import EXIT_INTERRUPTED, SoafarmError
from soafarm.logs import configure_logging

F = TypeVar("F", bound=Callable[..., Any])


class SoafarmGroup(click.Group):
    """A click group that turns SoafarmErrors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; user errors never show a traceback."""
        try:
            return super().invoke(ctx)
        except SoafarmError as e:
            click.echo(f"soafarm: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("soafarm: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def with_settings(f: F) -> F:
    """Add the shared connection options and pass the loaded `Settings` as first argument."""

    @click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        help="TOML settings file [env: SOAFARM_CONFIG].",
    )
    @click.option("--amqp-url", help="RabbitMQ URL(s), ';'-separated [env: SOAFARM_AMQP_URL].")
    @click.option("--redis-url", help="Redis URL [env: SOAFARM_REDIS_URL].")
    @click.option("--namespace", help="Prefix of every queue and key [env: SOAFARM_NAMESPACE].")
    @click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        help="Log level [env: SOAFARM_LOG_LEVEL; default: info].",
    )
    @functools.wraps(f)
    def wrapper(
        config_file: str | None,
        amqp_url: str | None,
        redis_url: str | None,
        namespace: str | None,
        log_level: str | None,
        **kwargs: Any,
    ) -> Any:
        settings: Settings = load_settings(
            config_file,
            {
                "amqp_url": amqp_url,
                "redis_url": redis_url,
                "namespace": namespace,
                "log_level": log_level,
            },
        )
        configure_logging(settings.log_format, settings.log_level)
        return f(settings, **kwargs)

    return wrapper  # type: ignore[return-value]


@click.group(cls=SoafarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="soafarm")
def cli() -> None:
    """soafarm: sessions, broker and service hosts on RabbitMQ and Redis."""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="soafarm")


from soafarm.cli import (  # noqa: E402  (commands register on `cli`)
    batch,
    call,
    dashboard,
    diagnose,
    farm,
    info,
    namespace,
    report,
    sessions,
    templates,
)

__all__ = [
    "batch",
    "call",
    "cli",
    "dashboard",
    "diagnose",
    "farm",
    "info",
    "main",
    "namespace",
    "report",
    "sessions",
    "templates",
    "with_settings",
]
