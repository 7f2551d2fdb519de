"""`eclip evaluate`: (being written)."""
from eclip.cli import app


@app.command(help="(not yet implemented)")
def evaluate():
    raise SystemExit("eclip evaluate: not yet implemented")
