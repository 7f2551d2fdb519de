"""`eclip train`: (being written)."""
from eclip.cli import app


@app.command(help="(not yet implemented)")
def train():
    raise SystemExit("eclip train: not yet implemented")
