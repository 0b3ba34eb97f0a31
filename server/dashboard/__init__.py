"""The consortium's web dashboard: the federation at a glance, live (``python -m server dashboard``).

Read-only over the run folders (:mod:`server.dashboard.run_reader`), served by
Starlette and uvicorn (:mod:`server.dashboard.app`, :mod:`server.dashboard.command`),
plotted by Plotly.js from the installed ``plotly`` package; loopback by default,
a token or TLS client certificates otherwise (:mod:`server.dashboard.security`).
"""
