"""The broker daemon: session service, allocator and host assignment (control path only)."""
