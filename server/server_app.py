"""fedseg ServerApp: the consortium's coordinator. The work lives in :mod:`server.federation`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation configured by the run config."""
    from server.federation import run_federation

    run_federation(grid, context)
