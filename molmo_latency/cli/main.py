"""Entry point: imports the command module a command line needs (each registers its commands on
the app), maps user errors to exit code 2 with a one-line message, never a traceback.

Start-up stays short because nothing heavy is imported before a command runs: the command
modules import polars, torch and the analysis packages inside their functions, and
``molmo-latency --help`` imports no command module at all (its listing comes from
:data:`COMMANDS`, which a test keeps equal to the commands' own help).
"""

from __future__ import annotations

import importlib
import sys

from molmo_latency.errors import MolmoLatencyError

# name: (module that registers it, its one-line help for the top-level listing), in listing order.
COMMANDS: dict[str, tuple[str, str]] = {
    "profile": ("molmo_latency.cli.profile_cmd",
                "Profile MODEL over the grid of SWEEP into RUN_DIR, then print the report."),
    "report": ("molmo_latency.cli.profile_cmd",
               "Per-configuration median/p95/CV of every phase, with PNG plots in RUN_DIR/report/."),
    "demo": ("molmo_latency.cli.profile_cmd",
             "A small sweep of the tiny reference model on CPU (well under 2 minutes), then its report."),
    "explain": ("molmo_latency.cli.explain_cmd",
                "Per configuration: median, p95 and CV of every phase; the share of the decode and prefill "
                "variance explained by SM clock, temperature and throttling; outliers with their likely cause; "
                "a plot of decode step time against SM clock."),
    "diff": ("molmo_latency.cli.diff_cmd",
             "What changed from A to B, phase by phase (with noise told apart from change) and kernel by kernel."),
    "fit": ("molmo_latency.cli.fit_cmd",
            "Fit the whole-request latency estimator (P50/P95 of prefill, of every decode step by position, of "
            "the whole request) on RUN_DIRs, evaluated on held-out configurations and held-out N."),
    "predict": ("molmo_latency.cli.fit_cmd",
                "P50 and P95 of a whole request of N output tokens (prefill, decode total, request) for one "
                "configuration."),
    "timeline": ("molmo_latency.cli.timeline_cmd",
                 "Write requests and their phases as a Chrome trace (Perfetto, chrome://tracing): a track per "
                 "thread, each phase and decode step a slice, NVML and host conditions as counter tracks."),
    "plan": ("molmo_latency.cli.plan_cmd",
             "The configurations whose whole request fits a latency budget at a quantile, with their P50/P95 (every "
             "combination of the knob values the model was fitted on, or those an accuracy table scores); with "
             "--accuracy, the Pareto frontier of accuracy against latency and the best configuration that fits."),
    "inspect": ("molmo_latency.cli.inspect_cmd",
                "Show the phase map found in MODEL, what was not found, and the knobs that apply, before anything "
                "is measured."),
    "trace": ("molmo_latency.cli.trace_cmd",
              "Read traces (torch.profiler Kineto JSON, Nsight Systems SQLite exports): GPU time per kernel, "
              "annotation and device."),
}
COMMAND_MODULES = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))

# Examples for the help of commands whose modules do not set their own epilog (added at load time).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "trace summary": ("molmo-latency trace summary runs/tiny/traces/c1-k1-b2-p16-n8-bs1.pt.trace.json.gz",
                      "molmo-latency trace summary trace.json.gz --json"),
}

# Options whose value may be left out: `--ray` alone means a local Ray.
OPTIONAL_VALUES = {"--ray": "local"}

#: How polars' allocator (its own jemalloc, configured by this environment variable when polars is
#: imported) hands freed memory back in a command-line process: unused pages purged after 200 ms.
#: polars' own setting (``dirty_decay_ms:500,muzzy_decay_ms:1000``, to which it appends ours, so
#: ours wins) keeps freed pages "muzzy" (MADV_FREE: still counted in the process's RSS until the
#: kernel needs them) for a further second. A trace read frees its decoded chunks table by table
#: while it builds the tables: with polars' setting they stay beside the tables (a 2 GB trace:
#: ~1.0 GB peak RSS instead of ~0.8). Set only when the user has not set it, before polars loads.
POLARS_ALLOCATOR_ENV = "_RJEM_MALLOC_CONF"
POLARS_ALLOCATOR_CONF = "dirty_decay_ms:200,muzzy_decay_ms:0"


def _allocator_policy() -> None:
    """Apply :data:`POLARS_ALLOCATOR_CONF` unless polars is loaded already or the user set their own.

    Example:
        >>> import os
        >>> _allocator_policy()
        >>> "polars" in sys.modules or os.environ.get(POLARS_ALLOCATOR_ENV) is not None
        True
    """
    import os

    if "polars" not in sys.modules:
        os.environ.setdefault(POLARS_ALLOCATOR_ENV, POLARS_ALLOCATOR_CONF)


def _import(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:  # a capability not built yet
        if exc.name != name:
            raise


def _load_commands(argv: list[str] | None = None) -> None:
    """Import what `argv` needs: its command's module (for anything unrecognised, every module,
    for the error message); every command not imported is listed by a stub that carries only
    its one-line help (so `--help` lists them all, and the app always has several commands)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), None)
    if command in COMMANDS:
        _import(COMMANDS[command][0])
    elif not (command is None and (not args or any(a in ("--help", "-h") for a in args))):
        for name in COMMAND_MODULES:
            _import(name)
    _register_listing_stubs()
    _add_examples()


def _add_examples() -> None:
    from molmo_latency.cli.app import app, examples

    infos = [("", info) for info in app.registered_commands]
    for group in app.registered_groups:
        infos += [(f"{group.name or group.typer_instance.info.name} ", info)
                  for info in group.typer_instance.registered_commands]
    for prefix, info in infos:
        name = prefix + (info.name or (info.callback.__name__.replace("_", "-") if info.callback else ""))
        if name in EXAMPLES and not info.epilog:
            info.epilog = examples(*EXAMPLES[name])


_stubs: list = []


def _registered_names(app) -> set[str]:
    names = {info.name or info.callback.__name__.replace("_", "-") for info in app.registered_commands
             if info.callback is not _stub}
    return names | {info.name or getattr(info.typer_instance.info, "name", None) for info in app.registered_groups}


def _register_listing_stubs() -> None:
    from molmo_latency.cli.app import app

    for info in _stubs:
        app.registered_commands.remove(info)
    _stubs.clear()
    real = _registered_names(app)
    for name, (_, help_text) in COMMANDS.items():
        if name not in real:
            app.command(name, help=help_text)(_stub)
            _stubs.append(app.registered_commands[-1])


def _stub() -> None:  # pragma: no cover - only listed by `--help`, never run
    raise MolmoLatencyError("internal: command module not loaded")


def _fill_optional_values(argv: list[str]) -> list[str]:
    """`--ray` with no value (last, or followed by another option) gets its default value.

    >>> _fill_optional_values(["profile", "--ray", "--workers", "2"])
    ['profile', '--ray', 'local', '--workers', '2']
    >>> _fill_optional_values(["profile", "--ray", "ray://head:10001"])
    ['profile', '--ray', 'ray://head:10001']
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in OPTIONAL_VALUES and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


def _interrupted(argv: list[str]) -> None:
    resume = (" (what was measured is kept: run the same command again to resume)"
              if argv[:1] and argv[0] in ("profile", "demo") else "")
    print(f"molmo-latency: interrupted{resume}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _allocator_policy()
    argv = _fill_optional_values(list(sys.argv[1:] if argv is None else argv))
    direct = None
    if argv[:2] == ["trace", "summary"]:  # the command users wait for most: no Typer run-time
        from molmo_latency.cli.trace_summary import direct_summary

        direct = direct_summary(argv[2:])
    if direct is None:
        _load_commands(argv)

    try:
        if direct is not None:
            direct()
        else:
            from molmo_latency.cli.app import app

            app(args=argv, prog_name="molmo-latency", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 130:  # Ctrl-C, caught by the command-line layer: say what happens next
            _interrupted(argv)
        return code
    except MolmoLatencyError as exc:
        print(f"molmo-latency: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full disk, a read-only filesystem: one line, never a traceback
        from molmo_latency.safe_fs import fault_line

        line = fault_line(exc)
        if line is None:
            raise
        print(f"molmo-latency: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _interrupted(argv)
        return 130
    return 0


def console() -> int:
    """The ``molmo-latency`` program and ``python -m molmo_latency``: :func:`main`, then every object
    the command left frozen (``gc.freeze``) just before the interpreter exits, so that its final
    garbage collection does not walk them all (the imports' modules, a read trace's names: ~25 ms of
    a ``trace summary``'s ~450). The exit itself is the usual one: ``atexit`` handlers run and
    standard output and error are flushed; objects freed by reference counting are freed as before.
    Not for a process that goes on after the command (tests call :func:`main`)."""
    code = main()
    import gc

    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console())
