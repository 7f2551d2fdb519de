"""`eclip explain`: (being written)."""
from eclip.cli import app


@app.command(help="(not yet implemented)")
def explain():
    raise SystemExit("eclip explain: not yet implemented")
