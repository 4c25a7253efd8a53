"""The Typer application all command modules register on."""

import typer

app = typer.Typer(
    name="molmo-latency",
    help="Phase-level latency profiler for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
