"""FLOPs and bytes of each phase of a request, from the model's config and the shapes actually
fed (transform: no torch, no model; numbers in, a table out).

What is counted (a multiply-add is 2 FLOPs; only matrix products, as
``torch.utils.flop_counter.FlopCounterMode`` counts them; norms, activations, softmax and RoPE
are left out):

- **vision**, per crop: the patch embedding, each block's Q/K/V/O projections, attention scores
  and weighted sum (all patches with all patches), and its 2-layer MLP;
- **projector**: every linear layer of the projector on the pooled tokens (``pooled_tokens``
  per crop; the projector's linear sizes are given as (in, out) pairs);
- **LLM calls** (prefill over the prompt, one decode step per new token after the first), per
  active block: ``attention`` (Q/K/V/O projections, scores and weighted sum of the T new tokens
  over the L + T tokens in the KV cache), ``moe_router`` (hidden x experts), ``moe_experts``
  (top-k experts per token, gate/up/down: SwiGLU) or ``mlp`` (dense), then ``lm_head`` on the
  rows whose logits generate() keeps (one per sequence).

Bytes are what a step must move at least: the weights it uses (attention and router weights of
each active block; the experts its tokens route to, expected distinct experts under uniform
routing ``E (1 - (1 - k/E)^T)``; the LM head) and the KV cache it reads and writes, at
``dtype_bytes`` per value. Activations are left out (small next to weights at decode).

Example:
    >>> text = TextShape(hidden=64, layers=4, heads=4, kv_heads=4, head_dim=16, intermediate=64,
    ...                  experts=8, top_k=2, vocab=512)
    >>> f = llm_call_flops(text, new=1, past=40, top_k=2, blocks=4)
    >>> f["attention"], f["moe_router"], f["moe_experts"], f["lm_head"]
    (173056, 4096, 196608, 65536)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

MODULE_KINDS = ("vision_block", "vision_embed", "projector", "attention", "moe_router", "moe_experts", "mlp",
                "lm_head")


@dataclass(frozen=True)
class TextShape:
    """The decoder's dimensions (``experts == 0``: a dense MLP of ``intermediate``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int
    top_k: int
    vocab: int
    gated: bool = True  # SwiGLU (gate, up, down) rather than a 2-layer MLP

    @classmethod
    def from_config(cls, cfg: Any) -> "TextShape":
        """From a transformers text config (OLMoE, Llama, Qwen2, Mixtral-style names) or a Molmo
        remote-code config (``d_model``, ``n_layers``, ``moe_num_experts``; its experts' SwiGLU
        width is half of ``mlp_hidden_size`` or ``mlp_ratio * d_model``)."""
        if hasattr(cfg, "d_model") and hasattr(cfg, "n_layers"):
            heads = int(cfg.n_heads)
            width = cfg.mlp_hidden_size if cfg.mlp_hidden_size is not None else cfg.mlp_ratio * cfg.d_model
            return cls(hidden=int(cfg.d_model), layers=int(cfg.n_layers), heads=heads,
                       kv_heads=int(getattr(cfg, "n_kv_heads", None) or heads),
                       head_dim=int(getattr(cfg, "head_dim", None) or cfg.d_model // heads),
                       intermediate=int(width) // 2, experts=int(getattr(cfg, "moe_num_experts", 0) or 0),
                       top_k=int(getattr(cfg, "moe_top_k", 0) or 0),
                       vocab=int(getattr(cfg, "embedding_size", None) or cfg.vocab_size))
        hidden = int(cfg.hidden_size)
        heads = int(cfg.num_attention_heads)
        experts = int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
                      or getattr(cfg, "n_routed_experts", None) or 0)
        inter = getattr(cfg, "moe_intermediate_size", None) if experts else None
        return cls(hidden=hidden, layers=int(cfg.num_hidden_layers), heads=heads,
                   kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(cfg, "head_dim", None) or hidden // heads),
                   intermediate=int(inter or cfg.intermediate_size), experts=experts,
                   top_k=int(getattr(cfg, "num_experts_per_tok", None) or 0), vocab=int(cfg.vocab_size))


@dataclass(frozen=True)
class VisionShape:
    """A ViT tower (SigLIP/CLIP): ``patches`` per crop of ``patch`` x ``patch`` x ``channels``."""

    hidden: int
    layers: int
    intermediate: int
    patch: int
    patches: int
    channels: int = 3

    @classmethod
    def from_config(cls, cfg: Any) -> "VisionShape":
        return cls(hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
                   intermediate=int(cfg.intermediate_size), patch=int(cfg.patch_size),
                   patches=(int(cfg.image_size) // int(cfg.patch_size)) ** 2,
                   channels=int(getattr(cfg, "num_channels", 3)))


def vision_flops(v: VisionShape, crops: int) -> dict[str, int]:
    """FLOPs of the vision tower on `crops` crops: ``vision_embed`` and ``vision_block``."""
    p, d = v.patches, v.hidden
    embed = 2 * p * d * v.channels * v.patch * v.patch
    block = 2 * p * d * d * 4 + 2 * 2 * p * p * d + 2 * 2 * p * d * v.intermediate
    return {"vision_embed": crops * embed, "vision_block": crops * v.layers * block}


def projector_flops(linears: list[tuple[int, int]], pooled_tokens: int, crops: int) -> dict[str, int]:
    """FLOPs of the projector's linear layers ((in, out) each) on the pooled tokens of `crops`."""
    return {"projector": crops * sum(2 * pooled_tokens * i * o for i, o in linears)}


def llm_call_flops(t: TextShape, *, new: int, past: int, top_k: int | None = None, blocks: int | None = None,
                   batch: int = 1, logits_rows: int = 1) -> dict[str, int]:
    """FLOPs of one LLM call feeding `new` tokens per sequence over `past` cached ones, with
    `blocks` active blocks and `top_k` experts per token, by module kind."""
    k = t.top_k if top_k is None else top_k
    n_blocks = t.layers if blocks is None else blocks
    rows = batch * new
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    attn = 2 * rows * t.hidden * (q + 2 * kv) + 2 * rows * q * t.hidden + 2 * 2 * rows * (past + new) * q
    ffn = 2 * t.hidden * t.intermediate * (3 if t.gated else 2)
    out = {"attention": n_blocks * attn, "lm_head": 2 * batch * logits_rows * t.hidden * t.vocab}
    if t.experts:
        out["moe_router"] = n_blocks * 2 * rows * t.hidden * t.experts
        out["moe_experts"] = n_blocks * rows * k * ffn
    else:
        out["mlp"] = n_blocks * rows * ffn
    return out


def llm_call_bytes(t: TextShape, *, new: int, past: int, top_k: int | None = None, blocks: int | None = None,
                   batch: int = 1, dtype_bytes: int = 2) -> dict[str, float]:
    """The least bytes one LLM call moves (weights used, KV cache read and written), by module kind."""
    k = t.top_k if top_k is None else top_k
    n_blocks = t.layers if blocks is None else blocks
    rows = batch * new
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    attn_w = t.hidden * (q + 2 * kv) + q * t.hidden
    cache = batch * 2 * kv * (past + new)  # read K and V of every position (written: the new ones)
    ffn_w = t.hidden * t.intermediate * (3 if t.gated else 2)
    out = {"attention": float(n_blocks * (attn_w + cache) * dtype_bytes),
           "lm_head": float(t.hidden * t.vocab * dtype_bytes)}
    if t.experts:
        distinct = t.experts * (1.0 - (1.0 - min(k, t.experts) / t.experts) ** rows)
        out["moe_router"] = float(n_blocks * t.hidden * t.experts * dtype_bytes)
        out["moe_experts"] = float(n_blocks * distinct * ffn_w * dtype_bytes)
    else:
        out["mlp"] = float(n_blocks * ffn_w * dtype_bytes)
    return out


def request_flops(t: TextShape, *, input_tokens: int, output_tokens: int, top_k: int | None = None,
                  blocks: int | None = None, batch: int = 1, vision: VisionShape | None = None, crops: int = 0,
                  projector: list[tuple[int, int]] | None = None, pooled_tokens: int = 0,
                  dtype_bytes: int = 2, prefill_logits_rows: int = 1) -> pl.DataFrame:
    """One row per (phase, step, module kind) of a request: ``flops`` and ``bytes``.

    Phases as the profiler names them: ``vision``, ``projector``, ``prefill`` (step 0) and
    ``decode`` steps 0..output_tokens-2, step s feeding one token over input_tokens + s cached.
    ``prefill_logits_rows``: the prompt positions whose logits the prefill computes (1 where
    generate() keeps only the last, as transformers does; the whole prompt for MolmoE's code).

    Example:
        >>> text = TextShape(hidden=64, layers=4, heads=4, kv_heads=4, head_dim=16, intermediate=64,
        ...                  experts=8, top_k=2, vocab=512)
        >>> t = request_flops(text, input_tokens=41, output_tokens=3)
        >>> t.group_by("phase", maintain_order=True).agg(pl.col("step").n_unique()).rows()
        [('prefill', 1), ('decode', 2)]
    """
    rows: list[dict[str, Any]] = []

    def add(phase: str, step: int, flops: dict[str, int], nbytes: dict[str, float]) -> None:
        for kind, value in flops.items():
            rows.append({"phase": phase, "step": step, "module_kind": kind, "flops": int(value),
                         "bytes": float(nbytes.get(kind, 0.0))})

    if vision is not None and crops:
        per = vision_flops(vision, crops * batch)
        weights = (vision.hidden * vision.channels * vision.patch ** 2,
                   vision.layers * (4 * vision.hidden ** 2 + 2 * vision.hidden * vision.intermediate))
        add("vision", 0, per, {"vision_embed": weights[0] * dtype_bytes, "vision_block": weights[1] * dtype_bytes})
    if projector and crops:
        add("projector", 0, projector_flops(projector, pooled_tokens, crops * batch),
            {"projector": sum(i * o for i, o in projector) * dtype_bytes})
    kw = {"top_k": top_k, "blocks": blocks, "batch": batch}
    add("prefill", 0, llm_call_flops(t, new=input_tokens, past=0, logits_rows=prefill_logits_rows, **kw),
        llm_call_bytes(t, new=input_tokens, past=0, dtype_bytes=dtype_bytes, **kw))
    for s in range(max(0, output_tokens - 1)):
        past = input_tokens + s
        add("decode", s, llm_call_flops(t, new=1, past=past, **kw),
            llm_call_bytes(t, new=1, past=past, dtype_bytes=dtype_bytes, **kw))
    return pl.DataFrame(rows, schema={"phase": pl.Utf8, "step": pl.Int64, "module_kind": pl.Utf8,
                                      "flops": pl.Int64, "bytes": pl.Float64}, orient="row")


@dataclass(frozen=True)
class Accelerator:
    """Peak dense bf16 tensor FLOP/s and memory bandwidth of a GPU (overridable values)."""

    name: str
    peak_flops: float
    peak_bytes_per_s: float
    source: str


# Dense (no sparsity) BF16 tensor-core peaks and HBM bandwidth, SXM parts, from NVIDIA's data
# sheets: A100 SXM4 80GB (312 TFLOP/s, 2.039 TB/s), H100 SXM5 (989 TFLOP/s, 3.35 TB/s), H200 SXM
# (989 TFLOP/s, 4.8 TB/s).
ACCELERATORS: dict[str, Accelerator] = {
    "A100": Accelerator("A100", 312e12, 2.039e12, "NVIDIA A100 Tensor Core GPU data sheet (SXM4 80GB, dense BF16)"),
    "H100": Accelerator("H100", 989e12, 3.35e12, "NVIDIA H100 Tensor Core GPU data sheet (SXM5, dense BF16)"),
    "H200": Accelerator("H200", 989e12, 4.8e12, "NVIDIA H200 Tensor Core GPU data sheet (SXM, dense BF16)"),
}


def accelerator(name: str) -> Accelerator:
    """The entry whose key is in `name` (``"NVIDIA H200"`` -> H200); one line naming the known ones
    otherwise (pass your own :class:`Accelerator` for another GPU)."""
    from molmo_latency.errors import MolmoLatencyError

    for key, acc in ACCELERATORS.items():
        if key.lower() in name.lower():
            return acc
    raise MolmoLatencyError(f"no peak figures for GPU {name!r}; known: {', '.join(ACCELERATORS)} "
                            "(pass Accelerator(name, peak_flops, peak_bytes_per_s, source) for another)")


def speed_of_light(table: pl.DataFrame, acc: Accelerator) -> pl.DataFrame:
    """Per phase instance: FLOPs, bytes and the speed-of-light time (the larger of compute-bound
    ``flops / peak_flops`` and memory-bound ``bytes / peak_bytes_per_s``), with which bound.

    Example:
        >>> t = pl.DataFrame({"phase": ["decode"], "step": [0], "module_kind": ["attention"],
        ...                   "flops": [int(1e9)], "bytes": [4.8e9]})
        >>> speed_of_light(t, ACCELERATORS["H200"]).select("sol_ms", "bound").row(0)
        (1.0, 'memory')
    """
    per = table.group_by("phase", "step", maintain_order=True).agg(pl.col("flops").sum(), pl.col("bytes").sum())
    return per.with_columns(
        (pl.col("flops") / acc.peak_flops * 1e3).alias("compute_ms"),
        (pl.col("bytes") / acc.peak_bytes_per_s * 1e3).alias("memory_ms"),
    ).with_columns(
        pl.max_horizontal("compute_ms", "memory_ms").alias("sol_ms"),
        pl.when(pl.col("compute_ms") >= pl.col("memory_ms")).then(pl.lit("compute")).otherwise(pl.lit("memory"))
        .alias("bound"))
