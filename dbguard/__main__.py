"""`python -m dbguard` runs the command line."""

from dbguard.cli import run

run()
