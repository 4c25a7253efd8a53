"""Which GPU to read, resolved once, and the telemetry source of a profiled block.

NVML numbers every GPU of the machine in PCI order and ignores ``CUDA_VISIBLE_DEVICES``, so a
CUDA index can name another GPU in NVML. :func:`resolve_gpu` names the GPU by its UUID, from
what torch reports for the CUDA device; the profiler, the sweep runner and the CLI's
``--nvml required`` check all call it, so they cannot look at different GPUs.

This is the only telemetry module that imports torch (analysis never needs it).

Example:
    >>> resolve_gpu("cpu")
    GpuIdentity(nvml_id=0, cuda_index=None)
    >>> open_telemetry(NvmlSettings("off"), "cpu") is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molmo_latency.errors import MolmoLatencyError
from molmo_latency.telemetry.policy import NvmlSettings, start_telemetry
from molmo_latency.telemetry.sampler import NvmlSampler

__all__ = ["GpuIdentity", "open_telemetry", "resolve_gpu"]


@dataclass(frozen=True)
class GpuIdentity:
    """The GPU a model or device runs on, as NVML names it.

    ``nvml_id`` is what :func:`~molmo_latency.telemetry.device.open_gpu` takes: the GPU's UUID
    (``"GPU-..."``) where torch reports one, else the index; ``cuda_index`` is the CUDA ordinal
    in this process, None for the CPU (then ``nvml_id`` is NVML's GPU 0).
    """

    nvml_id: int | str
    cuda_index: int | None = None

    @property
    def on_gpu(self) -> bool:
        """Whether the model or device is a CUDA one."""
        return self.cuda_index is not None


def resolve_gpu(where: torch.nn.Module | torch.device | str | int) -> GpuIdentity:
    """The NVML identity of the GPU that `where` runs on: a model (its first parameter's device),
    a ``torch.device``, ``"cpu"`` / ``"cuda[:N]"``, or a CUDA index.

    Without CUDA in this process (no GPU, a CPU build of torch) a CUDA device keeps its index as
    ``nvml_id``: NVML then opens that index or says why it cannot.
    """
    device = _device_of(where)
    if device.type != "cuda":
        return GpuIdentity(nvml_id=0, cuda_index=None)
    available = torch.cuda.is_available()
    index = device.index if device.index is not None else (torch.cuda.current_device() if available else 0)
    uuid = ""
    if available and index < torch.cuda.device_count():
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid:
        return GpuIdentity(nvml_id=uuid if uuid.startswith("GPU-") else f"GPU-{uuid}", cuda_index=index)
    return GpuIdentity(nvml_id=index, cuda_index=index)


def _device_of(where: torch.nn.Module | torch.device | str | int) -> torch.device:
    if isinstance(where, torch.nn.Module):
        param = next(where.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
    if isinstance(where, torch.device):
        return where
    if isinstance(where, int) and not isinstance(where, bool):
        return torch.device("cuda", where)
    if isinstance(where, str):
        try:
            return torch.device(where)
        except RuntimeError:
            pass
    raise MolmoLatencyError(f"resolve_gpu needs a model, a torch.device, 'cpu', 'cuda[:N]' or a CUDA "
                            f"index, got {where!r}")


def open_telemetry(settings: NvmlSettings, model: torch.nn.Module | torch.device | str) -> NvmlSampler | None:
    """Start the NVML sampler of a profiled block as `settings` say, or return None.

    The GPU read is ``settings.device`` when given, else the model's GPU (:func:`resolve_gpu`);
    a CPU model gets no telemetry under "auto" (GPU telemetry would explain nothing) and NVML's
    GPU 0 under "required". Stop it with :func:`~molmo_latency.telemetry.policy.stop_telemetry`.
    """
    if settings.mode == "off":
        return None
    device = settings.device
    if device is None:
        gpu = resolve_gpu(model)
        if not gpu.on_gpu and settings.mode == "auto":
            return None
        device = gpu.nvml_id
    return start_telemetry(settings.mode, device, interval_ms=settings.interval_ms)
