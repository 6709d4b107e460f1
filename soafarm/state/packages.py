"""Service packages deployed to a farm: a registration file and its code, as one zip kept in
Redis by content hash, so that a worker host on any machine can serve the service without a
copy of its own (HPC Pack's `hpcpack deploy` and `CCP_PACKAGE_ROOT`).

Two kinds of keys: `<ns>:packages`, a hash from the registration file's name
(`pricer.toml`, `pricer_1.2.toml`, which gives the service's name and version) to a JSON
`PackageRecord`; and `<ns>:package:<sha256>`, the zip itself. A deploy writes both in one
script and a removal drops the zip with its last reference, so a record never names a zip
that is gone. Hosts fetch and unpack a zip once per content hash (soafarm.registration.packages).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import redis

from soafarm.errors import DecodeError
from soafarm.names import Names
from soafarm.state import garbage
from soafarm.state.records import _JsonRecord

# Drops the zip of record `raw` (JSON) unless another record of the index names it.
_DROP_UNNAMED = """
local function drop_unnamed(index, prefix, raw)
  local ok, gone = pcall(cjson.decode, raw)
  if not ok or type(gone) ~= 'table' or type(gone['sha256']) ~= 'string' then return end
  for _, other in ipairs(redis.call('HVALS', index)) do
    local fine, record = pcall(cjson.decode, other)
    if fine and type(record) == 'table' and record['sha256'] == gone['sha256'] then return end
  end
  redis.call('DEL', prefix .. gone['sha256'])
end
"""

# KEYS: index, blob. ARGV: field, record JSON, zip, blob key prefix. The zip is named by its
# hash: writing it again is harmless. The zip of the record replaced goes unless still named.
_DEPLOY = (
    _DROP_UNNAMED
    + """
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if previous then drop_unnamed(KEYS[1], ARGV[4], previous) end
return 1
"""
)

# KEYS: index. ARGV: field, blob key prefix. The record removed, or nil.
_REMOVE = (
    _DROP_UNNAMED
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
drop_unnamed(KEYS[1], ARGV[2], raw)
return raw
"""
)


@dataclass(frozen=True)
class PackageRecord(_JsonRecord):
    """One deployed service package, as `soafarm services list` shows it."""

    #: The registration file's name inside the package (`<service>[_<version>].toml`).
    registration: str
    service: str
    version: str | None
    #: SHA-256 of the zip, hex: the package's identity, and its blob's key.
    sha256: str
    #: Bytes of the zip.
    size: int
    #: Files in the package.
    files: int
    #: When it was deployed (Unix time) and by which RabbitMQ user.
    deployed: float
    deployed_by: str

    @property
    def label(self) -> str:
        """`service` or `service version`."""
        return self.service if self.version is None else f"{self.service} {self.version}"


def sha256_of(blob: bytes) -> str:
    """The hex SHA-256 a package is named by."""
    return hashlib.sha256(blob).hexdigest()


class PackageStore:
    """The deployed packages of one namespace."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` (the farm's Redis account) for `names`' namespace."""
        self._r = client
        self.names = names
        self._deploy: Any = client.register_script(_DEPLOY)
        self._remove: Any = client.register_script(_REMOVE)

    def deploy(self, record: PackageRecord, blob: bytes) -> None:
        """Store `blob` and make `record` the package of its registration file name,
        replacing the one deployed under that name before (its zip stays while another
        record names it)."""
        self._deploy(
            keys=[self.names.packages_key, self.names.package_blob_key(record.sha256)],
            args=[record.registration, record.to_json(), blob, self.names.package_blob_key("")],
        )

    def records(self) -> dict[str, PackageRecord]:
        """Registration file name -> its deployed package (records that cannot be read are
        reported once and skipped)."""
        out: dict[str, PackageRecord] = {}
        raw: dict[bytes, bytes] = self._r.hgetall(self.names.packages_key)  # type: ignore[assignment]
        for field_name, value in raw.items():
            name = field_name.decode(errors="replace")
            try:
                out[name] = PackageRecord.from_json(value)
            except DecodeError as e:
                garbage.report(f"{self.names.packages_key}[{name}]", str(e), value)
        return out

    def blob(self, sha256: str) -> bytes | None:
        """The zip named `sha256`, or None if it is gone (removed meanwhile)."""
        raw: bytes | None = self._r.get(self.names.package_blob_key(sha256))  # type: ignore[assignment]
        return raw

    def remove(self, registration: str) -> PackageRecord | None:
        """Remove the package deployed under registration file name `registration`; the
        record removed, or None if there was none."""
        raw = self._remove(
            keys=[self.names.packages_key],
            args=[registration, self.names.package_blob_key("")],
        )
        if raw is None:
            return None
        try:
            return PackageRecord.from_json(raw)
        except DecodeError:
            return None
