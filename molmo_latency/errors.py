"""User-facing errors.

Everything a user can fix (a bad file, a bad option, a model we cannot map) raises
:class:`MolmoLatencyError` (or a subclass). The CLI turns it into a one-line message and exit
code 2, with no traceback. The message says what was wrong, with what input, and what to do.
"""


class MolmoLatencyError(ValueError):
    """A problem with the user's input: what was wrong, with what, and what to do."""


class AdapterError(MolmoLatencyError):
    """The profiler could not find the phases (vision, projector, LLM) in a model."""


class TraceError(MolmoLatencyError):
    """A trace file could not be read (truncated, not JSON, not a trace, ...)."""


class TraceWarning(UserWarning):
    """A trace was read but something in it is missing or was skipped (e.g. no GPU events).

    Defined here, beside TraceError, so that reading an nsys export in SQL imports no polars;
    :mod:`molmo_latency.trace` exports it (``from molmo_latency.trace import TraceWarning``)."""


class SweepError(MolmoLatencyError):
    """A sweep file or run directory is invalid or does not match the command."""


class NvmlUnavailable(MolmoLatencyError):
    """NVML was required but cannot be used on this machine."""


class EstimatorError(MolmoLatencyError):
    """An estimator model directory is missing, corrupted or does not fit the request."""
