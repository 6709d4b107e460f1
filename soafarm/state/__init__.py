"""State that both ends of the farm share through Redis: typed records and one store module
per kind of record. Nothing outside this package touches a Redis client's commands."""
