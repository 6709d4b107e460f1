"""Example services shipped with soafarm, each with its registration file (`<name>.toml`)."""
