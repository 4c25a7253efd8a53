"""Entry point: imports every command module (which register on the app) and maps user errors
to exit code 2 with a one-line message, never a traceback."""

from __future__ import annotations

import importlib
import sys

from molmo_latency.cli.app import app
from molmo_latency.errors import MolmoLatencyError

# One module per capability; each registers its commands on `app` when imported.
COMMAND_MODULES = (
    "molmo_latency.cli.profile_cmd",   # profile, report, demo        (sweep runner)
    "molmo_latency.cli.trace_cmd",     # trace summary                (trace reader)
    "molmo_latency.cli.explain_cmd",   # explain                      (telemetry)
    "molmo_latency.cli.diff_cmd",      # diff                         (trace/run diff)
    "molmo_latency.cli.fit_cmd",       # fit, predict                 (estimator)
)


def _load_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a capability not built yet
            if exc.name != name:
                raise


def main(argv: list[str] | None = None) -> int:
    _load_commands()
    try:
        app(args=argv, prog_name="molmo-latency", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return code
    except MolmoLatencyError as exc:
        print(f"molmo-latency: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("molmo-latency: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
