"""Every RabbitMQ queue name and Redis key, built in one place so the namespace is applied once.

AMQP names use `.` separators, Redis keys `:`; both start with the settings' namespace, which
is how tests (and several farms on one RabbitMQ/Redis) stay isolated from each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from soafarm.errors import ConfigError

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
#: What a user name keeps as it is in a queue name or routing key (`user_word`).
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def user_word(user: str) -> str:
    """A RabbitMQ user name as one word of a queue name or routing key: every character
    but letters, digits, '-' and '_' percent-encoded, so it holds no '.' and a permission
    pattern can name exactly its user's resources."""
    return "".join(
        c if c in _WORD_CHARS else "".join(f"%{b:02X}" for b in c.encode()) for c in user
    )


def word_user(word: str) -> str:
    """The user name `user_word` made `word` of."""
    return unquote(word)


def check_client_id(client_id: str) -> str:
    """Return `client_id` if it is 1-64 characters of letters, digits, '-', '_' or '.'."""
    if not 1 <= len(client_id) <= 64 or not set(client_id) <= _ID_CHARS:
        raise ConfigError(
            f"client id {client_id!r} must be 1-64 characters of letters, digits, '-', '_', '.'"
        )
    return client_id


@dataclass(frozen=True)
class Names:
    """Queue and key names of one namespace."""

    namespace: str

    # --- RabbitMQ -------------------------------------------------------------------------
    @property
    def control_queue(self) -> str:
        """The broker daemon's RPC queue (create / get / close / list sessions)."""
        return f"{self.namespace}.control"

    def request_queue(self, session_id: int) -> str:
        """The queue that holds a session's request batches, consumed by its service instances."""
        return f"{self.namespace}.session.{session_id}.requests"

    def response_queue(self, session_id: int, client_id: str, user: str) -> str:
        """The queue that holds the response batches of one client id of a session, which
        `user` attached: its name carries the user, so RabbitMQ's permissions let only that
        user read it (`permissions.client_permissions`)."""
        return (
            f"{self.namespace}.session.{session_id}.responses.{user_word(user)}."
            f"{check_client_id(client_id)}"
        )

    @property
    def control_exchange(self) -> str:
        """The direct exchange clients send control requests through (bound to the control
        queue): a client's user may publish to it, never to the default exchange."""
        return f"{self.namespace}.control"

    @property
    def request_exchange(self) -> str:
        """The topic exchange clients send request batches through; its routing keys start
        with the sender's `user_word`, which RabbitMQ's topic permissions check."""
        return f"{self.namespace}.requests"

    def request_key(self, session_id: int, user: str) -> str:
        """The routing key `user`'s request batches for a session take (bound to its request
        queue for each user the session admits)."""
        return f"{user_word(user)}.{session_id}"

    def return_key(self, session_id: int, client_id: str, user: str) -> str:
        """The routing key a reader of `user` gives batches back to its client id's response
        queue with (a reader that was taken over)."""
        return f"{user_word(user)}.r.{session_id}.{check_client_id(client_id)}"

    def session_queue_prefix(self, session_id: int) -> str:
        """Prefix shared by every queue of a session (used to find them on close)."""
        return f"{self.namespace}.session.{session_id}."

    # --- Redis ----------------------------------------------------------------------------
    @property
    def session_counter_key(self) -> str:
        """INCR counter that hands out session ids."""
        return f"{self.namespace}:session:next_id"

    @property
    def sessions_key(self) -> str:
        """Set of the ids of open sessions."""
        return f"{self.namespace}:sessions"

    def session_key(self, session_id: int) -> str:
        """Hash: the session record."""
        return f"{self.namespace}:session:{session_id}"

    def session_clients_key(self, session_id: int) -> str:
        """Set of the client ids that declared a response queue in this session."""
        return f"{self.namespace}:session:{session_id}:clients"

    def client_key(self, session_id: int, client_id: str) -> str:
        """Hash: a client id's progress (accepted, total, sealed, done, faulted, reader...)."""
        return f"{self.namespace}:session:{session_id}:client:{check_client_id(client_id)}"

    def client_done_key(self, session_id: int, client_id: str) -> str:
        """Bitmap: bit N set once request N of this client id has a response (counted once)."""
        return self.client_key(session_id, client_id) + ":done"

    def client_read_key(self, session_id: int, client_id: str) -> str:
        """Bitmap: bit N set once response N was handed to a reader (for `new_only` reads)."""
        return self.client_key(session_id, client_id) + ":read"

    def client_attempts_key(self, session_id: int, client_id: str) -> str:
        """Hash: request id -> executions counted after a crash or timeout (retry limit)."""
        return self.client_key(session_id, client_id) + ":attempts"

    def session_handles_key(self, session_id: int) -> str:
        """Sorted set: client handle -> time of its last heartbeat."""
        return f"{self.namespace}:session:{session_id}:handles"

    def session_usage_key(self, session_id: int) -> str:
        """Hash: unit-seconds and retries of the session's instances that exited (added by
        their hosts), taken into its usage record when it closes."""
        return f"{self.namespace}:session:{session_id}:usage"

    @property
    def redis_accounts_key(self) -> str:
        """Hash: fenced Redis account (ACL user) name -> its password (farm only)."""
        return f"{self.namespace}:redis-accounts"

    @property
    def admins_key(self) -> str:
        """Set: the RabbitMQ users granted the admin role at run time (`soafarm admin grant`)."""
        return f"{self.namespace}:admins"

    @property
    def usage_records_key(self) -> str:
        """Sorted set: JSON usage record of each closed session, scored by its close time."""
        return f"{self.namespace}:usage"

    def session_instances_key(self, session_id: int) -> str:
        """Hash: instance id -> JSON of the service instances serving this session."""
        return f"{self.namespace}:session:{session_id}:instances"

    def session_load_errors_key(self, session_id: int) -> str:
        """Hash: host id -> why the service could not be loaded there (last failure)."""
        return f"{self.namespace}:session:{session_id}:load_errors"

    def closed_session_key(self, session_id: int) -> str:
        """Tombstone kept for a while after close, so attach can say "closed", not "unknown"."""
        return f"{self.namespace}:session:{session_id}:closed"

    def common_data_key(self, token: str) -> str:
        """String: one msgpack-encoded common data value (see soafarm.state.commondata)."""
        return f"{self.namespace}:data:{token}"

    @property
    def packages_key(self) -> str:
        """Hash: registration file name -> the service package deployed under it (JSON
        `PackageRecord`, soafarm.state.packages)."""
        return f"{self.namespace}:packages"

    def package_blob_key(self, sha256: str) -> str:
        """String: a deployed service package's zip, named by its content's SHA-256."""
        return f"{self.namespace}:package:{sha256}"

    @property
    def targets_key(self) -> str:
        """Hash: session id -> units the allocator gives it now (its target)."""
        return f"{self.namespace}:targets"

    @property
    def statuses_key(self) -> str:
        """Hash: session id -> its SessionStatus (grow/shrink target, load, reason)."""
        return f"{self.namespace}:statuses"

    @property
    def hosts_key(self) -> str:
        """Hash: host id -> JSON of the registered worker hosts."""
        return f"{self.namespace}:hosts"

    @property
    def host_admin_key(self) -> str:
        """Hash: host id -> the state an operator set ("offline" or "draining"); apart from
        the host's record, which the host rewrites at every beat."""
        return f"{self.namespace}:hosts:admin"

    def host_heartbeat_key(self, host_id: str) -> str:
        """String with a TTL: present while the host is alive."""
        return f"{self.namespace}:host:{host_id}:heartbeat"

    def host_assignments_key(self, host_id: str) -> str:
        """Hash: session id -> number of service instances this host should run for it."""
        return f"{self.namespace}:host:{host_id}:assignments"

    def host_wake_key(self, host_id: str) -> str:
        """List the broker pushes to so a host reconciles its assignments at once."""
        return f"{self.namespace}:host:{host_id}:wake"

    def host_probe_key(self, host_id: str) -> str:
        """String with a TTL: JSON of the host's last service load probe (state.probes)."""
        return f"{self.namespace}:host:{host_id}:probe"

    def host_probe_asks_key(self, host_id: str) -> str:
        """List of request nonces (`soafarm services test`) the host's prober waits on."""
        return f"{self.namespace}:host:{host_id}:probe:asks"

    def host_load_key(self, host_id: str) -> str:
        """Hash: instance id -> JSON {session, capacity, busy} its instances report each second
        (busy: seconds spent in calls since the instance started)."""
        return f"{self.namespace}:host:{host_id}:load"
