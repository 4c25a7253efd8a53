"""molmo-latency: phase-level latency profiler for vision-language models.

    >>> from molmo_latency import profile_phases
    >>> from molmo_latency.models import reference_vlm
    >>> ref = reference_vlm("tiny")
    >>> with profile_phases(ref.model) as prof:
    ...     _ = ref.model.generate(**ref.request(crops=2, prompt_tokens=16, new_tokens=8))
    >>> prof.report().requests.select("decode_steps", "valid").row(0)
    (7, True)
"""

__version__ = "0.1.0"

__all__ = ["PhaseProfiler", "profile_phases", "__version__"]


def __getattr__(name: str):
    # Lazy: `import molmo_latency.trace` (or the CLI's trace commands) must not load torch.
    if name in ("PhaseProfiler", "profile_phases"):
        from molmo_latency import profiler

        return getattr(profiler, name)
    raise AttributeError(f"module 'molmo_latency' has no attribute {name!r}")
