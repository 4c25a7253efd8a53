"""The Typer application all command modules register on, and how help is shown."""

import typer
from typer.core import TyperOption

app = typer.Typer(
    name="molmo-latency",
    help="Phase-level latency profiler for vision-language models.",
    epilog="Examples:\n\b\n  molmo-latency demo\n  molmo-latency report RUN_DIR --wide",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_display_type_rich = TyperOption.display_type_rich


def _flag_shows_no_type(self: TyperOption, ctx) -> "str | None":
    """A flag takes no value, so help shows `--json`, not `--json <bool>`."""
    return None if self.is_flag else _display_type_rich(self, ctx)


TyperOption.display_type_rich = _flag_shows_no_type  # the only place help rendering is changed


def examples(*lines: str) -> str:
    """A command's help epilog: one or two runnable examples, one per line.

    >>> print(examples("molmo-latency demo"))
    Examples:
    \b
      molmo-latency demo
    """
    return "Examples:\n\b\n" + "\n".join(f"  {line}" for line in lines)
