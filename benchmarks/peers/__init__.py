"""The peers soafarm is measured against, each doing the same echo work."""
