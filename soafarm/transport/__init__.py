"""The transport edge: AMQP and Redis connections, queue topology, and how their errors map
to soafarm's."""
