"""Coarse kernel categories, so a user can see attention vs FFN vs MoE inside prefill and decode.

A GPU activity gets the first category whose rule matches, in this order:

==============  =================================================================================
category        rule (case-insensitive regex on the kernel name, or the activity kind)
==============  =================================================================================
memory          kind ``gpu_memcpy`` / ``gpu_memset``, or a name starting ``Memcpy`` / ``Memset``
communication   ``nccl``, ``rccl``, ``gloo``, ``all_reduce``/``allreduce``, ``all_gather``,
                ``reduce_scatter``, ``all_to_all``/``alltoall``, ``sendrecv``, custom all-reduce
moe_experts     fused / grouped expert GEMMs: ``fused_moe``, ``moe_gemm``, ``moe_mlp``,
                ``expert``, ``grouped_gemm``, ``group_gemm``, ``megablocks``
moe_routing     routing and its bookkeeping: ``topk`` / ``top_k`` (``gatherTopK``,
                ``topkGatingSoftmax``), ``moe_align``, ``moe_sum``, ``router``, ``routing``,
                token ``permute``/``unpermute``, radix ``sort`` / ``argsort``, ``histogram``,
                ``bincount``. Note: top-k *sampling* kernels land here too
attention       ``flash``, ``fmha``, ``attention``/``attn``, ``sdpa``, ``scaled_dot``, ``mha``,
                ``xformers``, paged attention, ``softmax`` (eager attention's softmax)
norm            ``layer_norm``/``layernorm``, ``rms_norm``/``rmsnorm``, ``batch_norm``,
                ``group_norm``, ``instance_norm``, cuDNN ``bn_fw``/``bn_bw``, ``welford``,
                PyTorch's layer-norm helpers ``RowwiseMoments`` / ``GammaBetaBackward``
gemm            matmul and convolution: ``gemm`` (but not the ``fbgemm`` library prefix),
                ``gemv``, ``cublas``, ``cutlass``, ``xmma``, ``wgmma``, ``matmul``, Triton ``mm``,
                rocBLAS/Tensile ``Cijk_``, ``splitKreduce``, cuDNN ``conv`` / ``fprop`` /
                ``dgrad`` / ``wgrad`` / ``scudnn``, ``fft``
elementwise     ``elementwise``, ``vectorized``, ``unrolled``, Triton pointwise/reduction
                (``triton_poi``/``triton_red``/``triton_per``), ``reduce_kernel``, ``fill``,
                ``copy``, ``index``, ``scatter``, ``gather``, ``cat``, layout transforms
                (``nchwToNhwc``), ``scan``, activations (``gelu``, ``silu``, ``relu``,
                ``sigmoid``, ``tanh``), ``dropout``, pooling, ``multi_tensor_apply`` (optimizers)
other           everything else
==============  =================================================================================

Rules are ordered so specific beats generic: ``fmha_cutlass`` is attention (not gemm),
``fused_moe_kernel`` is moe_experts, ``vectorized_layer_norm_kernel`` is norm. The patterns use
only syntax shared by Python ``re`` and polars (Rust ``regex``), so they can also be used in a
polars expression; :func:`kernel_category` applies them to one name (cached) and
:func:`with_category` to each distinct name of a table.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - imported where used: kernel_category needs no polars
    import polars as pl

__all__ = ["CATEGORIES", "CATEGORY_RULES", "CPU_OP_RULES", "cpu_op_category", "kernel_category", "with_category"]

#: Every category, in rule order (``other`` last).
CATEGORIES = (
    "memory", "communication", "moe_experts", "moe_routing", "attention", "norm", "gemm",
    "elementwise", "other",
)

#: (category, regex on the kernel name); the first match wins. ``memory`` also matches by kind.
CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    ("memory", r"(?i)^\s*mem(cpy|set)\b"),
    ("communication", r"(?i)nccl|rccl|gloo|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all"
                      r"|sendrecv|cross_device_reduce|custom_?ar"),
    ("moe_experts", r"(?i)fused_moe|moe_?gemm|moe_?mlp|expert|grouped_?gemm|group_?gemm|megablocks"),
    ("moe_routing", r"(?i)top_?k|moe_?align|moe_?sum|router|routing|permute_?tokens|unpermute"
                    r"|radix_?sort|radixsort|argsort|sort_?kernel|sort_?pairs|histogram|bincount"),
    ("attention", r"(?i)flash|fmha|attention|attn|sdpa|scaled_dot|mha|xformers|paged|softmax"),
    ("norm", r"(?i)layer_?norm|rms_?norm|batch_?norm|group_?norm|instance_?norm|\bbn_(fw|bw)"
             r"|::bn_|welford|gammabeta|rowwisemoments"),
    ("gemm", r"(?i)([^b]|^)gemm|([^f]|^)bgemm|gemv|cublas|cutlass|xmma|wgmma|matmul|triton_(tem_fused_)?mm|\bcijk_"
             r"|splitkreduce|conv|fprop|dgrad|wgrad|scudnn|fft"),
    ("elementwise", r"(?i)elementwise|vectorized|unrolled|triton_(poi|red|per)|reduce_kernel"
                    r"|fill|copy|index|scatter|gather|\bcat|nchwtonhwc|nhwctonchw|scan|gelu|silu"
                    r"|relu|sigmoid|tanh|dropout|multi_tensor_apply|pool"),
)

_MEMORY_KINDS = ("gpu_memcpy", "gpu_memset")
_COMPILED = tuple((category, re.compile(pattern)) for category, pattern in CATEGORY_RULES)
# The same rules for names already lowercased: a case-sensitive regex runs several times faster.
_LOWERCASE_RULES = tuple((category, pattern.removeprefix("(?i)")) for category, pattern in CATEGORY_RULES)


@lru_cache(maxsize=1 << 16)
def kernel_category(name: str, kind: str = "kernel") -> str:
    """The coarse category of one GPU activity (see the module docstring for the rules).

    Example:
        >>> kernel_category("flash_fwd_splitkv_kernel")
        'attention'
        >>> kernel_category("Memcpy HtoD (Pageable -> Device)", kind="gpu_memcpy")
        'memory'
        >>> kernel_category("void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_256x64_16x4_nn_align4>")
        'gemm'
    """
    if kind in _MEMORY_KINDS:
        return "memory"
    if name is None:
        return "other"
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return "other"


def with_category(gpu: pl.DataFrame) -> pl.DataFrame:
    """`gpu` (a table with ``name`` and ``kind``) plus a ``category`` column, vectorised.

    The rules run (as polars regexes on the lowercased name) once per distinct (name, kind): a
    trace has many launches but few distinct kernels; the result joins back onto every row.

    Example:
        >>> import polars as pl
        >>> gpu = pl.DataFrame({"name": ["rms_norm_kernel", "Memset (Device)", "fused_moe_kernel"],
        ...                     "kind": ["kernel", "gpu_memset", "kernel"]})
        >>> with_category(gpu)["category"].to_list()
        ['norm', 'memory', 'moe_experts']
    """
    import polars as pl

    names = gpu.select("name", "kind").unique()
    lowered = pl.col("name").str.to_lowercase()
    expr = pl.when(pl.col("kind").is_in(_MEMORY_KINDS)).then(pl.lit("memory"))
    for category, pattern in _LOWERCASE_RULES:
        expr = expr.when(lowered.str.contains(pattern)).then(pl.lit(category))
    names = names.with_columns(category=expr.otherwise(pl.lit("other")))
    return gpu.join(names, on=["name", "kind"], how="left", nulls_equal=True, maintain_order="left")


CPU_OP_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("moe_experts", re.compile(r"^aten::_?grouped_mm$")),
    ("attention", re.compile(r"^aten::(_scaled_dot_product\w*|scaled_dot_product_attention|_flash_attention\w*"
                             r"|_efficient_attention\w*)$")),
    ("gemm", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addmv|mv|dot|linear|matmul|einsum|conv\w*|_convolution\w*"
                        r"|mkldnn_convolution)$")),
    ("norm", re.compile(r"^aten::(\w*_norm|native_layer_norm|native_batch_norm)$")),
    ("moe_routing", re.compile(r"^aten::(sort|argsort|topk|bincount|histc)$")),
    ("memory", re.compile(r"^aten::(empty\w*|resize_|set_|zeros|ones|full|new_\w+)$")),
    ("elementwise", re.compile(r"^aten::(add|sub|rsub|mul|div|true_divide|floor_divide|remainder|fmod|pow"
                               r"|rsqrt|sqrt|exp|log|neg|abs|reciprocal|clamp\w*|where|masked_fill|lerp"
                               r"|addcmul|addcdiv|eq|ne|lt|le|gt|ge|bitwise_\w+|logical_\w+|sigmoid|tanh"
                               r"|gelu|silu|relu|softplus|sin|cos|mean|sum|prod|max|min|amax|amin|argmax"
                               r"|argmin|cumsum|any|all|isin|arange|fill|zero|ones_like|zeros_like)_?$")),
)


def cpu_op_category(name: str) -> str:
    """The category of a CPU op: aten GEMMs, attention, grouped expert GEMMs, norms, routing,
    allocations and arithmetic by name, then the kernel rules above (CPU-only traces have CPU ops, not kernels).

    Example:
        >>> [cpu_op_category(n) for n in ("aten::addmm", "aten::_grouped_mm", "aten::topk", "aten::mul_")]
        ['gemm', 'moe_experts', 'moe_routing', 'elementwise']
    """
    for category, pattern in CPU_OP_RULES:
        if pattern.match(name):
            return category
    return kernel_category(name)
