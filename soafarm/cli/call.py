"""`soafarm call`: one request to a service through a short-lived session."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json
from soafarm.config import Settings
from soafarm.errors import SoafarmError

if TYPE_CHECKING:
    from soafarm.client.session import Session


def _argument(text: str) -> Any:
    """JSON if it parses (numbers, lists, objects, quoted strings), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@cli.command()
@with_settings
@click.argument("service")
@click.argument("operation")
@click.argument("args", nargs=-1)
@click.option("--version", "version", help="Service version, like 1.0 (default: see docs).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def call(  # noqa: PLR0917 - click passes every option positionally by name
    settings: Settings,
    service: str,
    operation: str,
    args: tuple[str, ...],
    version: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Call OPERATION of SERVICE once with ARGS (each JSON, or a plain string); print the result.

    A fault from the service is printed as one line on stderr, with exit code 1.
    """
    from soafarm.client.broker_client import BrokerClient
    from soafarm.client.session import Session, SessionStartInfo

    info = SessionStartInfo(service, version=version, min_units=1, max_units=1)
    session = Session.create(info, settings)
    try:
        with BrokerClient(session) as client:
            client.send_request(operation, *(_argument(a) for a in args))
            client.end_requests()
            (response,) = list(client.get_responses(timeout=timeout))
    except BaseException as e:
        # whatever failed (Redis, RabbitMQ, the timeout, Ctrl-C), the session must not keep
        # its unit until an idle timeout; the error the user sees stays the first one
        note = close_after_failure(session)
        if note and isinstance(e, SoafarmError):
            e.args = (f"{e}; {note}",)
        raise
    session.close()
    result = response.result  # raises ServiceFault, printed by the CLI as one line
    if as_json:
        emit_json(result, raw=True)  # the service's own data: no field is the farm's
    else:
        click.echo(result)


def close_after_failure(session: Session) -> str:
    """Close `session` after a failed call (retrying for a while: the failure may be a
    restarting server); '' once closed, else a note for the error line."""
    from soafarm.client import session as sessions

    try:
        session.close()  # stops its heartbeat and connections, whatever happens
        return ""
    except Exception:
        error = sessions.close_best_effort(session.settings, session.id)
    if error is None:
        return ""
    return (
        f"session {session.id} could not be closed ({error}); the broker closes it once "
        "its client handle times out (client_idle_timeout)"
    )
