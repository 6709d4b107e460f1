"""The echo service of the seed: returns `"<hostname>:<input>"`."""

from __future__ import annotations

from soafarm.service import ServiceContext


class EchoService:
    """Echoes its input, prefixed with the host name of the instance that served it."""

    def __init__(self, context: ServiceContext) -> None:
        """Remember where this instance runs."""
        self.context = context

    def echo(self, value: object) -> str:
        """Return `"<hostname>:<value>"`."""
        return f"{self.context.host_name}:{value}"

    def whoami(self) -> str:
        """Return the id of the service instance that ran this call."""
        return self.context.instance_id
