"""Facts about the machine and the device a run measured on (for run.json and every row)."""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch


def device_columns(device: str) -> dict[str, Any]:
    """host, device, gpu_index, gpu_uuid, gpu_name, driver for the rows of a run."""
    cols: dict[str, Any] = {"host": platform.node(), "device": device, "gpu_index": None,
                            "gpu_uuid": None, "gpu_name": None, "driver": None}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        cols.update(device=f"cuda:{index}", gpu_index=index, gpu_name=props.name,
                    gpu_uuid=str(getattr(props, "uuid", "")) or None)
        try:
            import pynvml

            pynvml.nvmlInit()
            cols["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
            uuid = cols["gpu_uuid"]
            if uuid:  # by UUID: NVML ignores CUDA_VISIBLE_DEVICES, torch's index does not
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            cols["gpu_uuid"] = _text(pynvml.nvmlDeviceGetUUID(handle))
        except Exception:  # noqa: BLE001 - NVML is optional here
            pass
    return cols


def versions() -> dict[str, Any]:
    import polars
    import transformers

    from molmo_latency import __version__

    return {
        "molmo_latency": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "polars": polars.__version__,
        "cuda": torch.version.cuda, "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": _cpu_count(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
