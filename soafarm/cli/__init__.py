"""The `soafarm` command line: a click group whose commands share connection options.

Every command accepts `--config`, `--amqp-url`, `--redis-url`, `--namespace`, `--log-level`
and `--log-format` (also read from `SOAFARM_CONFIG`, `SOAFARM_AMQP_URL`, `SOAFARM_REDIS_URL`,
`SOAFARM_NAMESPACE`, `SOAFARM_LOG_LEVEL`, `SOAFARM_LOG_FORMAT`), after the command or before it
(`soafarm --namespace NS sessions list`); given at both places, the one nearer the command
wins. A `SoafarmError` is printed as one line on stderr and exits with its documented code;
see docs/cli.md.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from soafarm.config import Settings, load_settings
from soafarm.errors import EXIT_INTERRUPTED, SoafarmError
from soafarm.logs import LOG_FORMATS, configure_logging, prefer_format, report_error, say

F = TypeVar("F", bound=Callable[..., Any])

#: The settings options, by parameter name, as `load_settings` overrides them (config_file
#: is the file itself).
SETTINGS_PARAMS = ("config_file", "amqp_url", "redis_url", "namespace", "log_level", "log_format")
#: Where in `click.Context.meta` (shared by a command and its enclosing groups) the settings
#: options given so far, outermost first, are kept for the commands nested below.
_GIVEN = "soafarm.settings_options"


class SoafarmGroup(click.Group):
    """A click group that turns SoafarmErrors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; user errors never show a traceback."""
        try:
            return super().invoke(ctx)
        except SoafarmError as e:
            report_error(str(e), e.exit_code)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            say("interrupted", "soafarm: interrupted", level="warning")
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as e:
            refused = redis_refusal(e)
            if refused is None:
                raise
            report_error(refused, 1)
            ctx.exit(1)


def redis_refusal(error: BaseException) -> str | None:
    """One line for Redis refusing a command to this user's account (a user fenced to its
    sessions' keys running a command that reads the farm's), else None."""
    exceptions = getattr(sys.modules.get("redis"), "exceptions", None)
    if exceptions is None or not isinstance(error, exceptions.NoPermissionError):
        return None
    return (
        f"Redis refused this user's account: {error}; this command reads the farm's own "
        "state: run it with the farm's settings (an operator's), not a fenced user's"
    )


def settings_options(f: F) -> F:
    """The shared settings options, as click options of a command or group."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="TOML settings file [env: SOAFARM_CONFIG].",
        ),
        click.option("--amqp-url", help="RabbitMQ URL(s), ';'-separated [env: SOAFARM_AMQP_URL]."),
        click.option("--redis-url", help="Redis URL [env: SOAFARM_REDIS_URL]."),
        click.option("--namespace", help="Prefix of every queue and key [env: SOAFARM_NAMESPACE]."),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"]),
            help="Log level [env: SOAFARM_LOG_LEVEL; default: info].",
        ),
        click.option(
            "--log-format",
            type=click.Choice(LOG_FORMATS),
            help="Logs on stderr as key=value lines or one JSON object a line "
            "[env: SOAFARM_LOG_FORMAT; default: console].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def given_options(ctx: click.Context, own: dict[str, Any]) -> dict[str, Any]:
    """The settings options in force for `ctx`: those given before it (on enclosing groups)
    overridden by its own (`own`, None where not given); remembered for its subcommands."""
    given = {**ctx.meta.get(_GIVEN, {}), **{k: v for k, v in own.items() if v is not None}}
    ctx.meta[_GIVEN] = given
    return given


def with_settings(f: F) -> F:
    """Add the shared connection options and pass the loaded `Settings` as first argument.

    The options may also come before the command, on the groups it is in (`soafarm
    --namespace NS sessions list`, `soafarm hosts --namespace NS drain ID`): a value given
    nearer the command wins.
    """

    @settings_options
    @functools.wraps(f)
    def wrapper(**kwargs: Any) -> Any:
        own = {name: kwargs.pop(name) for name in SETTINGS_PARAMS}
        given = given_options(click.get_current_context(), own)
        prefer_format(given.get("log_format"))
        settings: Settings = load_settings(
            given.get("config_file"),
            {k: given.get(k) for k in SETTINGS_PARAMS if k != "config_file"},
        )
        configure_logging(settings.log_format, settings.log_level)
        return f(settings, **kwargs)

    return wrapper  # type: ignore[return-value]


@click.group(cls=SoafarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="soafarm")
@settings_options
def cli(**options: Any) -> None:
    """soafarm: sessions, broker and service hosts on RabbitMQ and Redis.

    The settings options (--config, --amqp-url, --redis-url, --namespace, --log-level,
    --log-format) may be given here, before the command, or after it.
    """
    given = given_options(click.get_current_context(), options)
    prefer_format(given.get("log_format"))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="soafarm")


from soafarm.cli import (  # noqa: E402  (commands register on `cli`)
    admin,
    batch,
    call,
    dashboard,
    diagnose,
    farm,
    info,
    namespace,
    packages,
    report,
    sessions,
    templates,
)

__all__ = [
    "admin",
    "batch",
    "call",
    "cli",
    "dashboard",
    "diagnose",
    "farm",
    "info",
    "main",
    "namespace",
    "packages",
    "report",
    "sessions",
    "templates",
    "with_settings",
]
