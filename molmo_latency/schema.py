"""Column contracts of the tables molmo-latency holds and writes.

Times inside are int64 nanoseconds on one host clock (`time.perf_counter_ns`); derived
durations are float milliseconds in `*_ms` columns. Every table is a polars DataFrame and is
written as Parquet.

A *run directory* (written by the sweep runner, `molmo-latency profile`) holds:

- ``requests.parquet``: one row per measured request (one generate() call), REQUEST_COLUMNS plus
  the configuration columns CONFIG_COLUMNS, ``config_id``, ``repeat`` and ``order`` (position in
  the interleaved run), ``reference_ms`` (a fixed CPU workload timed beside the request: the
  host's speed then, :class:`molmo_latency.conditions.SpeedReference`), the device columns
  DEVICE_COLUMNS and, when NVML was on, the telemetry aggregates TELEMETRY_AGG_COLUMNS (null
  otherwise).
- ``phases.parquet``: one row per phase instance, PHASE_COLUMNS plus ``config_id``, ``repeat`` and
  TELEMETRY_AGG_COLUMNS.
- ``telemetry.parquet`` (NVML on): one row per sample, TELEMETRY_SAMPLE_COLUMNS.
- ``failures.parquet``: ``config_id``, CONFIG_COLUMNS, ``error_type``, ``message``.
- ``run.json``: versions, GPU, model config, the sweep and the measurement protocol.
"""

PHASES = ("vision", "projector", "prefill", "decode")
# LLM calls that are neither prefill nor a decode step: a whole sequence recomputed without a
# KV cache (use_cache=False), several candidate tokens verified at once (assisted decoding).
OTHER_LLM_PHASES = ("recompute", "verify")
LLM_PHASES = ("prefill", "decode", *OTHER_LLM_PHASES)
# The named gaps of `other_ms` (time inside the request outside every phase); they sum to it.
OTHER_GAPS = ("input_prep", "embed_merge", "between_steps", "after_last")

# prof.report()["requests"]
REQUEST_COLUMNS = {
    "request": "int64",            # index of the generate() call inside the profiler
    "vision_ms": "float64",        # sum over vision instances of the request
    "projector_ms": "float64",
    "prefill_ms": "float64",       # first LLM forward (decoder + LM head)
    "decode_ms": "float64",        # sum of decode steps
    "decode_steps": "int64",
    "decode_per_token_ms": "float64",  # mean decode STEP (one forward, all rows); null without steps
    "other_ms": "float64",         # total - phases; never clamped (negative => valid=False)
    "total_ms": "float64",         # the whole generate() call, same timeline
    "prefill_total_ms": "float64", # vision + projector + prefill
    "input_tokens": "int64",       # prompt length incl. image tokens, per sequence
    "image_tokens": "int64",       # image placeholder tokens per sequence
    "output_tokens": "int64",      # new tokens per sequence
    "batch_size": "int64",
    "valid": "bool",
    "invalid_reason": "str",       # null when valid
    "complete": "bool",            # False when generate() raised
    "start_ns": "int64",
    "end_ns": "int64",
    "timer": "str",                # "cuda_event" or "perf_counter"
    # added by issue 13 (README "The requests and phases tables" says exactly what each means)
    "prefill_chunks": "int64",     # LLM calls that fed the prompt (1 without chunked prefill)
    "recompute_ms": "float64",     # calls that recomputed the whole sequence (no KV cache)
    "recompute_steps": "int64",
    "verify_ms": "float64",        # calls that verified several candidate tokens (assisted)
    "verify_steps": "int64",
    "tokens_per_step": "float64",  # rows each decode step advances (batch x beams), mean
    "num_beams": "int64",
    "output_tokens_per_row": "list[int64]",  # new tokens per returned row, up to its first EOS
    "image_tokens_per_row": "list[int64]",   # image tokens per input row
    "input_prep_ms": "float64",    # other_ms, part 1: request start -> first phase
    "embed_merge_ms": "float64",   # part 2: after vision/projector, before the first LLM phase
    "between_steps_ms": "float64", # part 3: between LLM phases (sampling, stopping criteria ...)
    "after_last_ms": "float64",    # part 4: last phase -> request end
    "unsplit_regions": "str",      # code whose inner phases could not be timed (compiled)
    "thread_id": "int64",          # threading.get_ident() of the thread that called generate()
    # the conditions the request ran under (molmo_latency.conditions: what each one means)
    "torch_threads": "int64",
    "cpu_time_ratio": "float64",
    "involuntary_switches": "int64",
    "host_load_1m": "float64",
    "warm": "bool",
    # added by issue 22
    "projector_inside_vision": "bool",  # True: the projector runs inside the vision module (its
                                        # time is in vision_ms); False: timed as its own phase;
                                        # null: no projector found (a warning said so)
    "blocks_run": "int64",         # text-model blocks the request ran (after the blocks knob)
}

# prof.report()["phases"]
PHASE_COLUMNS = {
    "request": "int64",
    "phase": "str",       # vision | projector | prefill | decode
    "step": "int64",      # decode step index 0..n-1; occurrence index for other phases
    "start_ns": "int64",
    "end_ns": "int64",
    "ms": "float64",
}

# Knobs of a configuration (sweep runner).
CONFIG_COLUMNS = {
    "crops": "int64",
    "top_k": "int64",
    "blocks": "int64",
    "prompt_tokens": "int64",
    "new_tokens": "int64",
    "batch_size": "int64",
}

DEVICE_COLUMNS = {
    "host": "str",
    "device": "str",       # "cpu" or "cuda:N"
    "gpu_index": "int64",  # null on CPU
    "gpu_uuid": "str",
    "gpu_name": "str",
    "driver": "str",
}

# Per phase instance and per request, from NVML samples (null when NVML is off/unavailable).
TELEMETRY_AGG_COLUMNS = {
    "sm_clock_mean_mhz": "float64",
    "sm_clock_min_mhz": "float64",
    "sm_clock_max_mhz": "float64",
    "mem_clock_mean_mhz": "float64",
    "temp_max_c": "float64",
    "power_mean_w": "float64",
    "energy_j": "float64",
    "throttle_reasons": "int64",   # OR of the clocks-event reasons bitmask seen
    "telemetry_samples": "int64",
}

# Added by the profiler next to TELEMETRY_AGG_COLUMNS (null when NVML is off/unavailable).
TELEMETRY_RATE_COLUMNS = {
    "telemetry_hz": "float64",         # samples per second achieved inside the interval
    "power_from_energy_w": "float64",  # energy-counter difference / duration (>= 2 samples inside)
}

# telemetry.parquet
TELEMETRY_SAMPLE_COLUMNS = {
    "t_ns": "int64",               # time.perf_counter_ns() at the read
    "gpu_index": "int64",
    "sm_clock_mhz": "float64",
    "mem_clock_mhz": "float64",
    "temp_c": "float64",
    "power_w": "float64",
    "energy_mj": "float64",        # NVML total energy counter (millijoules since driver load)
    "util_gpu_pct": "float64",
    "util_mem_pct": "float64",
    "throttle_reasons": "int64",
    "read_cost_ns": "int64",       # what this sample cost the sampler thread
}
