"""Service load probes in Redis: what each worker host can load, and requests to look again.

Each worker host probes every service of its registration path (`soafarm.workers.
service_probe`: import and construct, in a child process) whenever asked,
and keeps its latest report under its own key, with a TTL its prober renews while it runs:
a host that dies takes its report with it within `REPORT_TTL`, and nobody else has to
remove it. `soafarm services test` asks by pushing a nonce onto each live host's asks list;
a report names the nonces it answers, so the command knows a report is fresh.

Reports are JSON, readable with `redis-cli`; a report that cannot be decoded is skipped
(logged once), as any other record in Redis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from soafarm.errors import DecodeError
from soafarm.names import Names
from soafarm.plain import from_plain, to_plain
from soafarm.state import garbage
from soafarm.state.records import as_text

#: Seconds a host's report outlives its last renewal (its prober renews it every few
#: seconds while the host runs).
REPORT_TTL = 60.0
#: Seconds an ask stays in a host's list after its asker's wait (a host that died before
#: taking it leaves nothing behind for long).
ASK_TTL_MARGIN = 60.0


@dataclass(frozen=True)
class ServiceLoad:
    """How loading one registered service (import and constructor) went on one host."""

    ok: bool
    #: Why it did not load: the import's or the constructor's error, or the time limit.
    error: str = ""
    #: Something to know about a load that went well (its constructor reads common data,
    #: which a probe has not got, so it ran up to there).
    note: str = ""
    #: Seconds the import and constructor took.
    seconds: float = 0.0


@dataclass(frozen=True)
class ProbeReport:
    """One host's latest probe: service label (`name` or `name version`) -> how it loaded."""

    host_id: str
    #: When the probe ended (epoch seconds).
    probed_at: float
    results: dict[str, ServiceLoad] = field(default_factory=dict)
    #: Registration file -> why it cannot be read, as this host sees its registration path.
    invalid: dict[str, str] = field(default_factory=dict)
    #: Why the probe itself failed (its process crashed or ran out of time); no results then.
    error: str = ""
    #: The ask nonces (`soafarm services test`) this report answers; () for a start-up probe.
    answers: tuple[str, ...] = ()
    #: Seconds the whole probe took.
    took: float = 0.0

    def to_json(self) -> str:
        """Compact JSON of every field."""
        return json.dumps(to_plain(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ProbeReport:
        """Parse `to_json`'s output (DecodeError for anything else)."""
        where = "corrupt service probe report in Redis"
        try:
            data: Any = json.loads(raw)
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
            raise DecodeError(f"{where}: {e}") from None
        return from_plain(cls, data, where)

    def answers_ask(self, nonce: str) -> bool:
        """True if this report was made after the ask `nonce` reached the host."""
        return nonce in self.answers


class ProbeStore:
    """Typed reads and writes of the service load probes of one namespace."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for every probe key of `names`' namespace."""
        self._r = client
        self.names = names

    # --- asking (`soafarm services test`) -------------------------------------------------
    def ask(self, host_ids: list[str], nonce: str, wait: float) -> None:
        """Ask each host to probe again, answering `nonce`; the ask expires a while after
        the asker's `wait` seconds."""
        ttl = int((wait + ASK_TTL_MARGIN) * 1000)
        pipe = self._r.pipeline()
        for host_id in host_ids:
            key = self.names.host_probe_asks_key(host_id)
            pipe.rpush(key, nonce)
            pipe.pexpire(key, ttl)
        pipe.execute()

    def take_asks(self, host_id: str, timeout: float) -> list[str]:
        """Host side: block up to `timeout` seconds for asks; return every ask waiting (one
        probe answers them all), [] if none came. A key of the wrong type (only this store
        writes it) is reported and removed."""
        key = self.names.host_probe_asks_key(host_id)
        try:
            first = self._r.blpop([key], timeout=max(timeout, 0.01))
        except redis.ResponseError as e:
            if not garbage.is_wrong_type(e):
                raise
            garbage.report(key, "holds the wrong type of value", str(e))
            self._r.delete(key)
            return []
        if first is None:
            return []
        pipe = self._r.pipeline()  # MULTI: an ask pushed in between is either taken or kept
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        rest, _ = pipe.execute()
        return [as_text(first[1]), *(as_text(v) for v in rest)]

    # --- reports --------------------------------------------------------------------------
    def write(self, report: ProbeReport, ttl: float = REPORT_TTL) -> None:
        """Store a host's latest report for `ttl` seconds."""
        key = self.names.host_probe_key(report.host_id)
        self._r.set(key, report.to_json(), px=int(ttl * 1000))

    def keep(self, host_id: str, ttl: float = REPORT_TTL) -> None:
        """Renew a host's report for `ttl` seconds (nothing if it has none: a report is
        never made up by a renewal, say after its namespace was deleted)."""
        self._r.pexpire(self.names.host_probe_key(host_id), int(ttl * 1000))

    def forget(self, host_id: str) -> None:
        """Remove a host's report and asks (it stopped)."""
        self._r.delete(self.names.host_probe_key(host_id), self.names.host_probe_asks_key(host_id))

    def reports(self, host_ids: list[str]) -> dict[str, ProbeReport]:
        """The latest report of each of `host_ids` that has one (a report that cannot be
        decoded, or that names another host, is skipped and logged once)."""
        if not host_ids:
            return {}
        keys = [self.names.host_probe_key(h) for h in host_ids]
        raw: list[Any] = self._r.mget(keys)  # a key of another type reads as nil
        out: dict[str, ProbeReport] = {}
        for host_id, key, value in zip(host_ids, keys, raw, strict=True):
            if value is None:
                continue
            try:
                report = ProbeReport.from_json(value)
            except DecodeError as e:
                garbage.report(key, str(e), value)
                continue
            if report.host_id != host_id:
                garbage.report(key, f"report of host {report.host_id!r} under {host_id!r}", value)
                continue
            out[host_id] = report
        return out
