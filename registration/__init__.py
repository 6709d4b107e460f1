"""Service registration: TOML files that name a service's entry point and default settings."""

from soafarm.registration.registry import Registry
from soafarm.registration.schema import Registration, parse_file_name, parse_registration

__all__ = ["Registration", "Registry", "parse_file_name", "parse_registration"]
