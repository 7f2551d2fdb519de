"""`eclip embed`: (being written)."""
from eclip.cli import app


@app.command(help="(not yet implemented)")
def embed():
    raise SystemExit("eclip embed: not yet implemented")
