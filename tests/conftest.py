import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
