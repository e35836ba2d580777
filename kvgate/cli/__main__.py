"""`python -m kvgate.cli`: the `kvgate` command without its console script."""

from kvgate.cli.app import app

app()
