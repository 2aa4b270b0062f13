"""`python -m cli ...` runs the `slimline` command line."""
from cli.app import app

app()
