"""Job templates: what a session asks for, with its template's defaults filled in and its
limits checked (pure functions; the broker applies them at create)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from soafarm.config import JobTemplate, SchedulerSettings, priority_value
from soafarm.errors import ConfigError, TemplateLimitExceeded
from soafarm.resources import UNBOUNDED_UNITS, check_unit
from soafarm.state.control import CreateArgs


@dataclass(frozen=True)
class Asked:
    """A session's request with every default filled in and every limit checked."""

    template: str
    min_units: int
    max_units: int
    resource_unit: str
    priority: int
    node_groups: tuple[str, ...]
    #: The template's broker settings, to layer under the session's own.
    broker: dict[str, Any]


def find_template(scheduler: SchedulerSettings, name: str) -> JobTemplate:
    """The template `name` ("" means `Default`: the configured one, else the built-in
    template with no limits), or a ConfigError listing the known ones."""
    found = scheduler.template(name or "Default")
    if found is not None:
        return found
    if not name or name.lower() == "default":
        return JobTemplate()
    known = ", ".join(t.name for t in scheduler.job_templates)
    raise ConfigError(
        f"no job template {name!r} in the broker's settings; known: {known} "
        "(see `soafarm templates list`)"
    )


def apply_template(scheduler: SchedulerSettings, args: CreateArgs) -> Asked:
    """Fill what `args` leaves unset from its template and refuse what the template forbids
    (TemplateLimitExceeded naming the limit and the template)."""
    t = find_template(scheduler, args.job_template)
    where = f"job template {t.name!r}"
    min_units = t.min_units if args.min_units is None else args.min_units
    if args.max_units is not None:
        max_units = args.max_units
    elif t.max_units:
        max_units = max(t.max_units, min_units)
    else:
        max_units = UNBOUNDED_UNITS
    if min_units < 0 or max_units < max(min_units, 1):
        raise ConfigError(
            f"need 0 <= min_units <= max_units and max_units >= 1 (got {min_units}..{max_units})"
        )
    if t.units_limit:
        if min_units > t.units_limit:
            raise TemplateLimitExceeded(
                f"min_units {min_units} is above the {t.units_limit} units {where} allows"
            )
        max_units = min(max_units, t.units_limit) if args.max_units is None else max_units
        if max_units > t.units_limit:
            raise TemplateLimitExceeded(
                f"max_units {max_units} is above the {t.units_limit} units {where} allows "
                "(ask for fewer, or use another template)"
            )
    unit = check_unit(args.resource_unit or t.resource_unit)
    allowed_units = [u.strip() for u in t.allowed_resource_units.split(",") if u.strip()]
    if allowed_units and unit not in allowed_units:
        raise TemplateLimitExceeded(
            f"resource_unit {unit!r} is not allowed by {where}; allowed: {', '.join(allowed_units)}"
        )
    priority = priority_value(t.priority) if args.priority is None else args.priority
    priority = priority_value(priority)
    ceiling = priority_value(t.max_priority)
    if priority > ceiling:
        raise TemplateLimitExceeded(
            f"priority {priority} is above {where}'s max_priority {t.max_priority} ({ceiling})"
        )
    groups = t.node_group_list() if args.node_groups is None else tuple(args.node_groups)
    if any(not g or "," in g for g in groups):
        raise ConfigError(f"node group names must be non-empty, without commas: {list(groups)}")
    if (
        t.force_node_groups
        and args.node_groups is not None
        and set(groups) != set(t.node_group_list())
    ):
        raise TemplateLimitExceeded(
            f"{where} fixes the node groups to {list(t.node_group_list())}; "
            f"leave node_groups unset (asked for {list(groups)})"
        )
    return Asked(t.name, min_units, max_units, unit, priority, groups, dict(t.broker))
