"""`soafarm call`: one request to a service through a short-lived session."""

from __future__ import annotations

import json
from typing import Any

import click

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json
from soafarm.config import Settings


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
    with Session.create(info, settings) as session, BrokerClient(session) as client:
        client.send_request(operation, *(_argument(a) for a in args))
        client.end_requests()
        (response,) = list(client.get_responses(timeout=timeout))
    result = response.result  # raises ServiceFault, printed by the CLI as one line
    if as_json:
        emit_json(result)
    else:
        click.echo(result)
