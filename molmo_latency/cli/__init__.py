"""Command-line interface: `molmo-latency <command>`.

Each capability registers its commands on :data:`molmo_latency.cli.app.app` from its own
module in this package, so the CLI stays a thin "show" layer over library functions.
"""
