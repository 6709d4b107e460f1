"""One typed settings object, loaded once: defaults < TOML file < `SOAFARM_*` env vars < options.

Top-level keys map to `SOAFARM_<KEY>`; keys of a section map to `SOAFARM_<SECTION>_<KEY>`
(for example `SOAFARM_BROKER_MESSAGE_RESEND_LIMIT`). Unknown keys in the file or the
environment are rejected with the allowed names, so a typo never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from soafarm.errors import ConfigError

ENV_PREFIX = "SOAFARM_"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
MiB = 1024 * 1024


def mask_url(url: str) -> str:
    """Return `url` with its password replaced by `**`, safe for logs and error messages."""
    return str(maybe_sanitize_url(url, mask="**"))


@dataclass(frozen=True)
class BrokerSettings:
    """Per-session broker policies, with the names and defaults of HPC Pack's seeds.

    Times are in seconds. These can be overridden per service (registration `[broker]` table)
    and per session (`SessionStartInfo.broker_settings`).
    """

    message_resend_limit: int = 3
    service_operation_timeout: float = 86_400.0
    client_connection_timeout: float = 300.0
    client_idle_timeout: float = 300.0
    session_idle_timeout: float = 0.0
    durable_session_idle_timeout: float = 172_800.0
    message_throttle_start_threshold: int = 5_120
    message_throttle_stop_threshold: int = 3_840
    load_sampling_interval: float = 1.0
    #: Seconds between a session's shrink decisions (and the autoscaler's pool decisions):
    #: a session whose load ratio is below `allocation_shrink_load_ratio_threshold` hands
    #: units back at most this often; one above `allocation_grow_load_ratio_threshold` grows
    #: at the next allocation round.
    allocation_adjust_interval: float = 60.0
    allocation_grow_load_ratio_threshold: int = 125
    allocation_shrink_load_ratio_threshold: int = 75
    #: Seconds between writes of a session's status (load ratio, target units, reason) when
    #: nothing but the load changed; a change of target or state is written at once.
    status_update_interval: float = 15.0
    #: Seconds a host that failed to load the session's service is excluded for it before it
    #: is tried again; a session whose service failed again on every live host after that
    #: retry fails.
    end_point_not_found_retry_period: float = 300.0
    #: Seconds a durable session with nothing outstanding and no client keeps its units
    #: (then it is `released`, still readable, and gets units again when a client sends).
    durable_release_timeout: float = 60.0

    def idle_limit(self, durable: bool) -> float:
        """Seconds a session may stay without clients: durable sessions wait longer."""
        return self.durable_session_idle_timeout if durable else self.session_idle_timeout


@dataclass(frozen=True)
class ClientSettings:
    """How the client library talks to the farm."""

    #: Requests sent close together travel in one AMQP message of at most this many requests.
    request_batch_size: int = 100
    #: Seconds to wait for the broker daemon to answer a control request (create, close...).
    control_timeout: float = 10.0
    #: Seconds to wait for a TCP connection to RabbitMQ before reporting it unreachable.
    connect_timeout: float = 5.0
    #: Seconds send_request may block on a throttled session before raising Throttled (0: no
    #: limit).
    throttle_timeout: float = 0.0
    #: Seconds a request may wait in the client's buffer for others to travel with it before
    #: it is sent without flush() (0: every request is sent at once, in a message of its own).
    linger: float = 0.005
    #: Seconds a client keeps retrying (with back-off) after it lost RabbitMQ or Redis before
    #: it gives up with ConnectionLost: readers, response handlers and senders ride out a
    #: restart of either server shorter than this.
    reconnect_timeout: float = 90.0
    #: An interactive client id's requests sent and not read back (requests still running
    #: plus responses waiting unread) at which send_request blocks until reading catches up;
    #: it bounds what RabbitMQ holds for a client that sends and does not read (0: no bound).
    #: Durable responses are on disk in a stream, meant to be read later: not bounded.
    max_unread_responses: int = 250_000


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker host registers and runs service instances."""

    #: Cores this host offers; 0 means all cores of the machine.
    cores: int = 0
    #: CPU sockets this host reports (socket resource units); 0 means detect.
    sockets: int = 0
    #: Memory this host reports, in MiB; 0 means detect.
    memory_mb: int = 0
    #: The pool this host belongs to (the autoscaler's provisioners start hosts per pool).
    pool: str = "default"
    #: Free-form labels shown by `soafarm hosts`, as "key=value,key=value".
    labels: str = ""
    #: Seconds between heartbeats written to Redis.
    heartbeat_interval: float = 1.0
    #: A host whose heartbeat is older than this many seconds is treated as lost.
    host_timeout: float = 5.0
    #: MiB of resident memory past which a service instance is recycled after its current
    #: calls (drained, then replaced at once); 0 means no limit.
    instance_max_memory: int = 0
    #: Fork servers this host keeps with a service's module imported, one per service most
    #: recently used here (least recently used goes first), so the next instance of that
    #: service starts by a fork in milliseconds; besides them one more keeps only soafarm
    #: imported, for a service's first use. 0 turns warm starts off: every instance is a new
    #: interpreter (about 0.5 s of a core).
    warm_instances: int = 4
    #: Run each instance's service code in a process of its own that holds none of the
    #: farm's credentials (no URLs in its environment, no sockets, the instance's memory
    #: unreadable): calls go to it over a local socket (docs/security.md). Services are
    #: then not kept warm (a fork server would import them beside the credentials).
    isolate_services: bool = False
    #: The OS user that isolated service code runs as (the host must run as root); set, it
    #: turns `isolate_services` on. Empty: the host's own user, who can still read the files
    #: the host can (its settings file among them).
    service_user: str = ""
    #: The interpreter isolated service code runs with (soafarm and the service's packages
    #: importable by it, and readable by `service_user`); empty: the host's own.
    service_python: str = ""

    def isolated(self) -> bool:
        """Whether service code runs in a process of its own."""
        return self.isolate_services or bool(self.service_user)

    def effective_cores(self) -> int:
        """The number of cores to offer: `cores`, or the machine's count when 0."""
        return self.cores or (os.cpu_count() or 1)

    def effective_sockets(self) -> int:
        """Sockets to report: `sockets`, else those Linux lists, never more than the cores."""
        found = self.sockets or _detect_sockets()
        return max(1, min(found, self.effective_cores()))

    def effective_memory_mb(self) -> int:
        """Memory to report in MiB: `memory_mb`, or the machine's physical memory when 0."""
        if self.memory_mb:
            return self.memory_mb
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MiB
        except (ValueError, OSError):
            return 0

    def label_map(self) -> dict[str, str]:
        """`labels` parsed into a dict (validated when the settings are loaded)."""
        pairs = [p.strip() for p in self.labels.split(",") if p.strip()]
        return dict(p.split("=", 1) for p in pairs)


def _detect_sockets() -> int:
    """Distinct physical packages Linux reports (1 where it reports none)."""
    packages = set()
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/physical_package_id"):
        try:
            packages.add(path.read_text().strip())
        except OSError:
            continue
    return len(packages) or 1


@dataclass(frozen=True)
class PoolSettings:
    """One pool of worker hosts the autoscaler may grow and shrink."""

    name: str = "default"
    #: "local" (worker processes on this machine) or "kubernetes" (a Deployment's replicas).
    provisioner: str = "local"
    min_hosts: int = 0
    max_hosts: int = 2
    #: Cores each host of this pool offers (local: passed to `soafarm worker --cores`).
    cores_per_host: int = 1
    #: Kubernetes provisioner: the Deployment running `soafarm worker`, and its namespace.
    deployment: str = "soafarm-worker"
    kubernetes_namespace: str = "default"
    #: Kubernetes provisioner: kubeconfig context to use; empty means in-cluster config when
    #: running in a pod, else the current context.
    kubernetes_context: str = ""


@dataclass(frozen=True)
class AutoscalerSettings:
    """How `soafarm autoscaler` grows and shrinks the pools (intervals and load-ratio
    thresholds are the broker settings of the same names, per session)."""

    #: Seconds with no outstanding work before the pools shrink to their min_hosts (often 0).
    idle_timeout: float = 60.0
    #: Pools in order: a later pool (a "burst" pool) grows only when every earlier one is at
    #: max_hosts, and is emptied first when load falls.
    pools: tuple[PoolSettings, ...] = (PoolSettings(),)


#: HPC Pack's named job priorities and their values (a priority may be given either way).
PRIORITIES: dict[str, int] = {
    "lowest": 0,
    "below_normal": 1000,
    "normal": 2000,
    "above_normal": 3000,
    "highest": 4000,
}
SCHEDULER_MODES = ("queued", "balanced")


def priority_value(priority: int | str, where: str = "priority") -> int:
    """`priority` as an integer: a named priority (`lowest` ... `highest`, any case, with
    `-`, `_` or nothing between words) or an integer 0..4000 as is."""
    if isinstance(priority, bool):
        raise ConfigError(f"{where} must be a name or an integer, not {priority!r}")
    if isinstance(priority, int):
        if not 0 <= priority <= PRIORITIES["highest"]:
            raise ConfigError(f"{where} must be between 0 and 4000, not {priority}")
        return priority
    text = str(priority).strip().lower().replace("-", "_")
    folded = {k.replace("_", ""): v for k, v in PRIORITIES.items()}
    if text.isdigit():
        return priority_value(int(text), where)
    if text in PRIORITIES or text.replace("_", "") in folded:
        return PRIORITIES.get(text, folded.get(text.replace("_", ""), 0))
    raise ConfigError(
        f"{where} {priority!r} is not a priority; use one of {', '.join(PRIORITIES)} "
        "or an integer 0..4000"
    )


@dataclass(frozen=True)
class JobTemplate:
    """A named job template: defaults and limits applied to the sessions that name it
    (`SessionStartInfo(job_template=...)`; sessions naming none use `Default`).

    Defaults fill what a session leaves unset; limits refuse a session that asks for more.
    """

    name: str = "Default"
    description: str = ""
    #: Default units when the session gives none (`max_units` 0: as many as the farm has).
    min_units: int = 1
    max_units: int = 0
    #: The most units a session of this template may ask for as `max_units` and `min_units`
    #: (0: no limit).
    units_limit: int = 0
    #: Default resource unit, and the units allowed (comma-separated; empty: any).
    resource_unit: str = "core"
    allowed_resource_units: str = ""
    #: Default priority, and the highest a session may ask for (names or 0..4000).
    priority: str = "normal"
    max_priority: str = "highest"
    #: Default node groups (comma-separated); with `force_node_groups` a session may not
    #: name others.
    node_groups: str = ""
    force_node_groups: bool = False
    #: Broker settings applied under the session's own (above the service registration's).
    # (left out of the hash: settings are hashed as a whole to key connection pools)
    broker: dict[str, Any] = field(default_factory=dict, hash=False)

    def node_group_list(self) -> tuple[str, ...]:
        """`node_groups` split on commas."""
        return _split(self.node_groups)


def _split(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True)
class SchedulerSettings:
    """How the broker shares the farm's units between sessions (one policy per farm)."""

    #: "queued": spare units go to sessions in order of priority, then age, each up to its
    #: target; "balanced": spare units are shared evenly between the sessions that want
    #: more, higher priority first on ties. Minimums come first in both.
    mode: str = "queued"
    #: Job templates by name; `Default` applies to sessions that name none.
    job_templates: tuple[JobTemplate, ...] = (JobTemplate(),)

    def template(self, name: str) -> JobTemplate | None:
        """The template called `name` (case-insensitive), or None."""
        return next((t for t in self.job_templates if t.name.lower() == name.lower()), None)


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoints (`/metrics`, and `/healthz` beside it) of the broker daemon,
    each worker host and the autoscaler."""

    enabled: bool = True
    #: Address the endpoints listen on ("0.0.0.0" in a container, for Prometheus to reach).
    bind: str = "127.0.0.1"
    #: A port already taken (several hosts on one machine, as `soafarm up` runs them) falls
    #: back to one the system picks; the URL is logged (`metrics_serving`) and a host's shows
    #: in `soafarm hosts --json` (`metrics_url`). 0: always let the system pick.
    broker_port: int = 9464
    worker_port: int = 9465
    autoscaler_port: int = 9466
    #: Upper bounds (seconds) of the call-duration histogram's buckets.
    call_duration_buckets: tuple[float, ...] = (
        0.001,
        0.005,
        0.01,
        0.05,
        0.1,
        0.5,
        1.0,
        5.0,
        10.0,
        60.0,
        300.0,
    )


@dataclass(frozen=True)
class TlsSettings:
    """Certificates for `amqps://` and `rediss://` URLs (both servers): the CA that signed
    the servers' certificates (empty: the system's CAs), and this process's own certificate
    and key where the servers ask for one (mutual TLS). Servers are always verified."""

    ca_file: str = ""
    cert_file: str = ""
    #: Empty with a cert_file: the key is in the cert_file.
    key_file: str = ""


@dataclass(frozen=True)
class UsageSettings:
    """The usage records the broker keeps of closed sessions (`soafarm report`)."""

    #: Seconds a closed session's record is kept (30 days).
    retention: float = 30 * 86_400.0


@dataclass(frozen=True)
class SecuritySettings:
    """Who may do what (docs/security.md). A caller is the RabbitMQ user its connection
    logged in as: RabbitMQ checks the `user_id` each control request carries."""

    #: Comma-separated RabbitMQ users with the admin role (every session, host actions,
    #: `soafarm admin`), besides the broker daemon's own user; more are granted at run time
    #: with `soafarm admin grant`.
    admins: str = ""
    #: Comma-separated RabbitMQ users whose responses clients accept (the users worker hosts
    #: connect as); empty: the broker daemon's own user. A response published by anyone
    #: else is dropped and counted.
    farm_users: str = ""
    #: Groups of users a shared session may admit by name (`share_with=["@traders"]`): a
    #: table of group name -> its users (a comma-separated string, or a list).
    groups: dict[str, Any] = field(default_factory=dict, hash=False)
    #: Give each user that is not one of the farm's a Redis account (ACL user) per session
    #: it may use, fenced to that session's keys (docs/security.md); off, or when the
    #: broker's Redis account may not manage ACL users: clients use their own settings'.
    fence_redis: bool = True

    def __post_init__(self) -> None:
        """Group members must be user names."""
        for name, members in self.groups.items():
            if not isinstance(members, str) and not (
                isinstance(members, list | tuple) and all(isinstance(m, str) for m in members)
            ):
                raise ConfigError(
                    f"security.groups.{name}: expected a comma-separated string or a list of "
                    f"user names, got {members!r}"
                )

    def groups_of(self, user: str) -> frozenset[str]:
        """The groups `user` is a member of."""
        return frozenset(
            name
            for name, members in self.groups.items()
            if user in (_split(members) if isinstance(members, str) else members)
        )

    def admin_list(self) -> tuple[str, ...]:
        """`admins` split on commas."""
        return _split(self.admins)

    def farm_user_list(self) -> tuple[str, ...]:
        """`farm_users` split on commas."""
        return _split(self.farm_users)


@dataclass(frozen=True)
class Settings:
    """Everything configurable in soafarm. Build it with `load_settings()`."""

    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = "soafarm"
    service_registration_path: tuple[Path, ...] = ()
    max_message_bytes: int = 4 * MiB
    max_common_data_bytes: int = 64 * MiB
    #: Largest service package (`soafarm services deploy`), zipped.
    max_package_bytes: int = 64 * MiB
    #: Where deployed packages are unpacked on each machine; empty: ~/.cache/soafarm/packages
    #: (or $XDG_CACHE_HOME/soafarm/packages). A namespace gets a folder of its own in it.
    package_cache: str = ""
    log_format: str = "console"
    log_level: str = "info"
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    autoscaler: AutoscalerSettings = field(default_factory=AutoscalerSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    usage: UsageSettings = field(default_factory=UsageSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)

    def __repr__(self) -> str:
        shown = {**self.as_dict()}
        inner = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"Settings({inner})"

    @property
    def amqp_urls(self) -> list[str]:
        """The AMQP URLs to try in order (failover): `amqp_url` split on `;`."""
        return [u.strip() for u in self.amqp_url.split(";") if u.strip()]

    def as_dict(self) -> dict[str, Any]:
        """A plain dict of every setting with secrets masked (for `soafarm config show`)."""
        out = dataclasses.asdict(self)
        out["amqp_url"] = ";".join(mask_url(u) for u in self.amqp_urls)
        out["redis_url"] = mask_url(self.redis_url)
        out["service_registration_path"] = [str(p) for p in self.service_registration_path]
        return out

    def replace(self, **changes: Any) -> Settings:
        """A copy with top-level fields changed."""
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type[Any]] = {
    "broker": BrokerSettings,
    "client": ClientSettings,
    "worker": WorkerSettings,
    "autoscaler": AutoscalerSettings,
    "scheduler": SchedulerSettings,
    "metrics": MetricsSettings,
    "usage": UsageSettings,
    "tls": TlsSettings,
    "security": SecuritySettings,
}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool | float):
        raise ValueError(value)
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(value)
    return value


def _to_paths(value: Any) -> tuple[Path, ...]:
    items = value.split(os.pathsep) if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(value)
    return tuple(Path(str(p)).expanduser() for p in items if str(p))


_CONVERTERS: dict[Any, Any] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _to_floats(value: Any) -> tuple[float, ...]:
    """A list of numbers, from TOML or a comma-separated env value, sorted ascending."""
    items = value.split(",") if isinstance(value, str) else list(value)
    numbers = sorted(float(x) for x in items if str(x).strip())
    if not numbers or numbers[0] <= 0:
        raise ValueError(value)
    return tuple(numbers)


_TABLE_LISTS: tuple[type[Any], ...] = (PoolSettings, JobTemplate)


def _to_tables(kind: type[Any], value: Any, where: str) -> tuple[Any, ...]:
    """Tables from TOML (`[[autoscaler.pools]]`, `[[scheduler.job_templates]]`) or an env
    var (a JSON list of tables)."""
    what = "pool" if kind is PoolSettings else "job template"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a JSON list of {what} tables") from None
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of {what} tables")
    tables: list[Any] = []
    for i, table in enumerate(value):
        if isinstance(table, kind):
            tables.append(table)
            continue
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}[{i}]: each {what} must be a table")
        tables.append(_apply(kind, kind(), table, f"{where}[{i}]"))
    return tuple(tables)


def _to_table(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise ValueError(value)
    return dict(value)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Convert a TOML or env value to the annotated type, or raise ConfigError naming `where`."""
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[0] in _TABLE_LISTS:
        return _to_tables(typing.get_args(kind)[0], value, where)
    if typing.get_origin(kind) is dict:
        try:
            return _to_table(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a table, got {value!r}") from None
    if kind == tuple[float, ...]:
        convert: Any = _to_floats
    else:
        convert = _to_paths if typing.get_origin(kind) is tuple else _CONVERTERS.get(kind)
    if convert is None:
        raise ConfigError(f"{where}: unsupported setting type {kind!r}")
    try:
        return convert(value)
    except (TypeError, ValueError):
        name = (
            "a list of positive numbers"
            if kind == tuple[float, ...]
            else getattr(kind, "__name__", "list of paths")
        )
        raise ConfigError(f"{where}: expected {name}, got {value!r}") from None


def _field_types(cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _apply(cls: type[Any], current: Any, values: Mapping[str, Any], where: str) -> Any:
    """Return `current` (a dataclass) with `values` applied, rejecting unknown keys."""
    types_ = _field_types(cls)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types_:
            allowed = ", ".join(sorted(types_))
            raise ConfigError(f"{where}: unknown setting {key!r}; allowed: {allowed}")
        kind = types_[key]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: [{key}] must be a table")
            changes[key] = _apply(kind, getattr(current, key), value, f"{where} [{key}]")
        else:
            changes[key] = _coerce(value, kind, f"{where}: {key}")
    return dataclasses.replace(current, **changes)


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn `SOAFARM_*` variables into the nested dict shape of the TOML file."""
    top = _field_types(Settings)
    out: dict[str, Any] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        key = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in _SECTIONS if key.startswith(s + "_")), None)
        if section is not None and key[len(section) + 1 :] in _field_types(_SECTIONS[section]):
            out.setdefault(section, {})[key[len(section) + 1 :]] = raw
        elif key in top and key not in _SECTIONS:
            out[key] = raw
        else:
            allowed = sorted(
                [ENV_PREFIX + k.upper() for k in top if k not in _SECTIONS]
                + [f"{ENV_PREFIX}{s.upper()}_<KEY>" for s in _SECTIONS]
            )
            raise ConfigError(f"unknown environment variable {var}; allowed: {', '.join(allowed)}")
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning every failure into a ConfigError that names the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8: a Latin-1 comment, a binary file
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings: defaults, then the TOML file, then env vars, then `overrides`.

    `config_file` defaults to `$SOAFARM_CONFIG`; `overrides` are already-typed top-level values
    (from CLI options); `None` values in it are ignored.
    """
    env = os.environ if environ is None else environ
    settings = Settings()
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        settings = _apply(Settings, settings, read_toml(Path(path)), str(path))
    settings = _apply(Settings, settings, _env_values(env), "environment")
    if overrides:
        settings = _apply(
            Settings, settings, {k: v for k, v in overrides.items() if v is not None}, "options"
        )
    _validate(settings)
    result: Settings = settings
    return result


def with_section(settings: Settings, section: str, values: Mapping[str, Any]) -> Settings:
    """`settings` with keys of one section changed (from CLI options), validated again."""
    result: Settings = _apply(Settings, settings, {section: values}, "options")
    _validate(result)
    return result


def broker_settings_with(
    base: BrokerSettings, values: Mapping[str, Any], where: str
) -> BrokerSettings:
    """`base` with per-service or per-session broker settings applied (unknown keys rejected)."""
    result: BrokerSettings = _apply(BrokerSettings, base, values, where)
    return result


def _validate(settings: Settings) -> None:
    if not settings.namespace or not all(c.isalnum() or c in "-_." for c in settings.namespace):
        raise ConfigError(
            f"namespace {settings.namespace!r} must be non-empty and use only letters, digits, "
            "'-', '_' and '.'"
        )
    if settings.max_message_bytes < 1024:
        raise ConfigError("max_message_bytes must be at least 1024")
    if settings.client.request_batch_size < 1:
        raise ConfigError("client.request_batch_size must be at least 1")
    if settings.client.linger < 0:
        raise ConfigError(f"client.linger must be 0 or more seconds, not {settings.client.linger}")
    if settings.client.reconnect_timeout < 0:
        raise ConfigError("client.reconnect_timeout must be 0 or more seconds")
    if settings.client.max_unread_responses < 0:
        raise ConfigError("client.max_unread_responses must be 0 (no bound) or more")
    if settings.log_level not in {"debug", "info", "warning", "error"}:
        raise ConfigError(
            f"log_level must be debug, info, warning or error, not {settings.log_level!r}"
        )
    if settings.log_format not in {"console", "json"}:
        raise ConfigError(f"log_format must be 'console' or 'json', not {settings.log_format!r}")
    labels = [p.strip() for p in settings.worker.labels.split(",") if p.strip()]
    if any("=" not in p or not p.split("=", 1)[0] for p in labels):
        raise ConfigError(
            f"worker.labels must look like 'key=value,key=value', not {settings.worker.labels!r}"
        )
    if settings.worker.instance_max_memory < 0:
        raise ConfigError("worker.instance_max_memory must be 0 (no limit) or more MiB")
    if settings.worker.warm_instances < 0:
        raise ConfigError("worker.warm_instances must be 0 (warm starts off) or more")
    _validate_pools(settings.autoscaler.pools)
    _validate_scheduler(settings.scheduler)


def _validate_scheduler(scheduler: SchedulerSettings) -> None:
    if scheduler.mode not in SCHEDULER_MODES:
        raise ConfigError(f"scheduler.mode must be 'queued' or 'balanced', not {scheduler.mode!r}")
    names = [t.name.lower() for t in scheduler.job_templates]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError("scheduler.job_templates: template names must be non-empty and unique")
    for t in scheduler.job_templates:
        where = f"job template {t.name!r}"
        priority_value(t.priority, f"{where}: priority")
        priority_value(t.max_priority, f"{where}: max_priority")
        units = ("core", "socket", "node")
        for unit in (t.resource_unit, *_split(t.allowed_resource_units)):
            if unit not in units:
                raise ConfigError(f"{where}: resource unit {unit!r} is not one of {units}")
        if t.min_units < 0 or t.max_units < 0 or t.units_limit < 0:
            raise ConfigError(f"{where}: min_units, max_units and units_limit must be >= 0")
        if t.max_units and t.max_units < max(t.min_units, 1):
            raise ConfigError(f"{where}: max_units must be 0 (unbounded) or >= min_units")
        broker_settings_with(BrokerSettings(), t.broker, f"{where}: broker")


def _validate_pools(pools: tuple[PoolSettings, ...]) -> None:
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ConfigError(f"autoscaler.pools: pool names must be unique, got {names}")
    for p in pools:
        where = f"autoscaler pool {p.name!r}"
        if p.provisioner not in {"local", "kubernetes"}:
            raise ConfigError(
                f"{where}: provisioner must be 'local' or 'kubernetes', not {p.provisioner!r}"
            )
        if not 0 <= p.min_hosts <= p.max_hosts:
            raise ConfigError(f"{where}: need 0 <= min_hosts <= max_hosts")
        if p.cores_per_host < 1:
            raise ConfigError(f"{where}: cores_per_host must be at least 1")


def settings_env(settings: Settings) -> dict[str, str]:
    """`SOAFARM_*` variables that make `load_settings()` in a child process rebuild `settings`.

    Used to start broker, worker and service-instance processes with exactly the parent's
    effective settings (file, environment and options already applied).
    """

    def text(value: Any) -> str:
        if isinstance(value, tuple) and value and isinstance(value[0], _TABLE_LISTS):
            return json.dumps([dataclasses.asdict(p) for p in value])
        if isinstance(value, dict):
            return json.dumps(value)
        if isinstance(value, tuple) and value and isinstance(value[0], float):
            return ",".join(str(x) for x in value)
        if isinstance(value, tuple):
            return os.pathsep.join(str(p) for p in value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    out: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in _SECTIONS:
            for sf in dataclasses.fields(value):
                var = f"{ENV_PREFIX}{f.name.upper()}_{sf.name.upper()}"
                out[var] = text(getattr(value, sf.name))
        else:
            out[f"{ENV_PREFIX}{f.name.upper()}"] = text(value)
    return out


def child_environment(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a soafarm child process: `base` (default os.environ) with every
    `SOAFARM_*` variable replaced by those of `settings_env(settings)`."""
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(ENV_PREFIX)
    }
    env.update(settings_env(settings))
    return env
