"""A farm on this machine: `soafarm up`/`demo`'s launcher and the private RabbitMQ and Redis
servers it starts when none answers."""
