"""Node groups: which hosts a session may use (pure functions, no I/O).

A host is in the node group named by its pool, by each of its label keys, and by each
`key=value` of its labels; a session that names node groups may use only the hosts that are
in all of them (HPC Pack's default, intersect).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from soafarm.state.records import HostRecord


def host_groups(host: HostRecord) -> set[str]:
    """The node groups `host` is in."""
    return {host.pool, *host.labels, *(f"{k}={v}" for k, v in host.labels.items())}


def in_groups(host: HostRecord, groups: Iterable[str]) -> bool:
    """Whether `host` is in every one of `groups` (True for none)."""
    return set(groups) <= host_groups(host)


def outside(hosts: Mapping[str, HostRecord], groups: Iterable[str]) -> set[str]:
    """The hosts of `hosts` a session of node groups `groups` must not use."""
    wanted = set(groups)
    if not wanted:
        return set()
    return {h for h, record in hosts.items() if not wanted <= host_groups(record)}
