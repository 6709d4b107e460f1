"""`soafarm templates list`: the job templates the broker applies to new sessions."""

from __future__ import annotations

import click

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json, emit_table
from soafarm.client.control import ControlClient
from soafarm.config import JobTemplate, Settings
from soafarm.state.control import TemplatesArgs


@cli.group()
def templates() -> None:
    """Job templates: defaults and limits for the sessions that name them."""


def _limits(t: JobTemplate) -> str:
    parts = [f"units <= {t.units_limit}"] if t.units_limit else []
    if t.allowed_resource_units:
        parts.append(f"unit in {t.allowed_resource_units}")
    if t.max_priority != "highest":
        parts.append(f"priority <= {t.max_priority}")
    if t.force_node_groups:
        parts.append("node groups fixed")
    return ", ".join(parts) or "-"


@templates.command("list")
@with_settings
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def templates_list(settings: Settings, as_json: bool) -> None:
    """List the broker's job templates with their defaults and limits (`Default` applies
    to sessions that name none)."""
    control = ControlClient(settings)
    try:
        found = control.request(TemplatesArgs())
    finally:
        control.close()
    if as_json:
        emit_json(found.to_wire())
        return
    emit_table(
        f"Job templates in namespace {settings.namespace!r}",
        ["name", "units", "unit", "priority", "node groups", "broker settings", "limits", "about"],
        [
            (
                t.name,
                f"{t.min_units}..{t.max_units or 'all'}",
                t.resource_unit,
                t.priority,
                t.node_groups or "any",
                ", ".join(f"{k}={v}" for k, v in sorted(t.broker.items())) or "-",
                _limits(t),
                t.description,
            )
            for t in found.items
        ],
    )
