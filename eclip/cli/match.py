"""`eclip match`: (being written)."""
from eclip.cli import app


@app.command(help="(not yet implemented)")
def match():
    raise SystemExit("eclip match: not yet implemented")
