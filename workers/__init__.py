"""Worker hosts: register, heartbeat, and run service instances for assigned sessions."""
