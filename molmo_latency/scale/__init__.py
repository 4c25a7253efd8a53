"""Scale-out: one sweep sharded over many GPUs and machines on Ray (the optional extra
``pip install 'molmo-latency[ray]'``). Ray is imported only when a sweep runs on it.

    >>> import tempfile
    >>> from molmo_latency.scale import run_sweep_ray
    >>> from molmo_latency.sweep import SweepSpec
    >>> spec = SweepSpec.from_dict({"crops": [1], "repeats": 2, "warmup": 0, "new_tokens": [2]})
    >>> run_sweep_ray("tiny", spec, tempfile.mkdtemp(), workers=1)["measured"]
    2
"""

from molmo_latency.scale.ray_runner import SweepActor, WorkerProgress, gpu_identity, run_sweep_ray

__all__ = ["run_sweep_ray", "SweepActor", "WorkerProgress", "gpu_identity"]
