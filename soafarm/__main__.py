"""`python -m soafarm` runs the CLI (used to start farm processes with this interpreter)."""

from soafarm.cli import main

main()
