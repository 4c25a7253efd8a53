import os
import tempfile

import pytest
import torch

# The trace cache (molmo_latency.trace.cache) of every command the tests run goes to one temporary
# folder, never beside the test data (tests/data; ../shared is read-only). Tests of the cache
# itself name their own folders.
os.environ.setdefault("MOLMO_LATENCY_CACHE_DIR", tempfile.mkdtemp(prefix="molmo-latency-cache-"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Ray's memory monitor kills workers when the whole machine's memory passes 95%, whoever uses it:
# a test's verdict must not depend on what other processes hold (the Ray tests' own models are
# tiny). Set before any test starts a Ray cluster; users' Ray settings are not touched.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """The tiny reference VLM on CPU (shared: tests must restore any knob they change)."""
    from molmo_latency.models import reference_vlm

    ref = reference_vlm("tiny", seed=0)
    ref.model.generate(**ref.request(crops=1, new_tokens=2))  # warm up lazy init
    return ref
