"""The diff's statistics and name alignment on hand-made samples: what a user relies on when
reading a verdict or a kernel row."""

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmo_latency.diff import compare_samples, kernel_diff, normalize_kernel_name, phase_diff
from molmo_latency.diff.kernels import category_diff, cpu_self_ns
from molmo_latency.diff.stats import bootstrap_median_diff_ci, holm


def _noisy(center, n, seed, cv=0.05):
    return list(np.random.default_rng(seed).normal(center, cv * center, n))


def test_clear_shift_is_slower_and_faster_the_other_way():
    a, b = _noisy(10.0, 12, 1), _noisy(12.0, 12, 2)
    up, down = compare_samples(a, b), compare_samples(b, a)
    assert (up["verdict"], down["verdict"]) == ("slower", "faster")
    assert up["ci_low_ms"] > 0 and down["ci_high_ms"] < 0
    assert up["delta_ms"] == pytest.approx(np.median(b) - np.median(a))
    assert up["a_p95_ms"] == pytest.approx(np.quantile(a, 0.95))


def test_same_sample_is_no_change_with_zero_delta():
    a = _noisy(10.0, 10, 3)
    row = compare_samples(a, list(a))
    assert row["verdict"] == "no significant change"
    assert row["delta_ms"] == 0.0 and row["ci_low_ms"] <= 0.0 <= row["ci_high_ms"]
    assert row["p_value"] == pytest.approx(1.0)


def test_consistent_but_tiny_change_is_below_the_practical_threshold():
    a = list(np.linspace(10.0, 10.01, 20))
    b = [x * 1.005 for x in a]  # +0.5 %: every B above every A, so p is tiny
    row = compare_samples(a, b)
    assert row["p_value"] < 1e-6 and row["ci_low_ms"] > 0
    assert row["verdict"] == "no significant change" and row["reason"].startswith("|delta| < 1%")
    assert compare_samples(a, b, min_effect_pct=0.1)["verdict"] == "slower"


def test_spread_hides_a_small_shift():
    a = _noisy(10.0, 6, 4, cv=0.3)
    b = [x + 0.3 for x in _noisy(10.0, 6, 5, cv=0.3)]
    assert compare_samples(a, b)["verdict"] == "no significant change"


def test_too_few_samples_never_give_a_verdict():
    row = compare_samples([10.0], [20.0])
    assert row["verdict"] == "too few samples" and row["p_value"] is None
    assert row["delta_ms"] == 10.0


def test_samples_that_cannot_reach_alpha_say_so_instead_of_no_change():
    """3 against 3, every B far above every A: the exact two-sided Mann-Whitney p is at best
    2 / C(6, 3) = 0.1 >= 0.05, so no size of change could be significant; 4 against 4 can
    (2 / C(8, 4) = 0.029). Under Holm over 7 rows, 5 a side reach at best 7 * 2 / C(10, 5) = 0.056."""
    from math import comb

    from molmo_latency.diff.stats import repeats_needed

    assert 2 / comb(6, 3) >= 0.05 > 2 / comb(8, 4)
    row = compare_samples([10.0, 10.1, 10.2], [100.0, 100.1, 100.2])
    assert row["verdict"] == "too few samples" and "at least 4 repeats" in row["reason"]
    assert compare_samples([10.0, 10.1, 10.2, 10.3], [100.0, 100.1, 100.2, 100.3])["verdict"] == "slower"
    five = compare_samples([10.0 + i / 10 for i in range(5)], [100.0 + i / 10 for i in range(5)],
                           p_adjusted=7 * 2 / comb(10, 5), family_size=7)
    assert 7 * 2 / comb(10, 5) >= 0.05 and five["verdict"] == "too few samples"
    assert repeats_needed(0.05, 7) == 6 and 7 * 2 / comb(12, 6) < 0.05


def test_bootstrap_is_seeded():
    a, b = _noisy(5.0, 9, 6), _noisy(5.5, 9, 7)
    assert bootstrap_median_diff_ci(a, b, seed=3) == bootstrap_median_diff_ci(a, b, seed=3)
    assert bootstrap_median_diff_ci(a, b, seed=3) != bootstrap_median_diff_ci(a, b, seed=4)


def test_holm_matches_the_textbook_procedure():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def _samples(phase_values):
    rows = [(p, i, v) for p, vs in phase_values.items() for i, v in enumerate(vs)]
    return pl.DataFrame(rows, schema={"phase": pl.String, "request": pl.Int64, "value_ms": pl.Float64},
                        orient="row")


def test_phase_diff_rows_and_families():
    a = _samples({"prefill": _noisy(3.0, 8, 8), "total": _noisy(20.0, 8, 9), "decode[0]": _noisy(1.0, 8, 10),
                  "vision": _noisy(1.0, 8, 11)})
    b = _samples({"prefill": _noisy(6.0, 8, 12), "total": _noisy(23.0, 8, 13), "decode[0]": _noisy(1.0, 8, 14)})
    out = phase_diff(a, b)
    assert out["phase"].to_list() == ["prefill", "total", "decode[0]"]  # vision only in A: left out
    assert out["family"].to_list() == ["phase", "phase", "step"]
    verdicts = dict(zip(out["phase"], out["verdict"]))
    assert verdicts["prefill"] == "slower" and verdicts["total"] == "slower"
    # Holm within the headline family: each adjusted p is at least the raw one
    assert all(adj >= raw for adj, raw in zip(out["p_adjusted"], out["p_value"]))


def _ops(rows):
    return pl.DataFrame(rows, schema={"name": pl.String, "category": pl.String, "phase": pl.String,
                                      "dur_ns": pl.Int64, "self_ns": pl.Int64}, orient="row")


def test_kernel_diff_ranks_by_contribution_and_lists_one_sided_kernels():
    a = _ops([("gemm_a", "gemm", "prefill", 5000, 5000), ("gemm_a", "gemm", "decode", 1000, 1000),
              ("norm", "norm", "decode", 700, 700), ("old", "other", "decode", 300, 300)])
    b = _ops([("gemm_a", "gemm", "prefill", 2000, 2000), ("gemm_a", "gemm", "decode", 1000, 1000),
              ("norm", "norm", "decode", 800, 800), ("new", "other", "prefill", 50, 50)])
    k = kernel_diff(a, b)
    assert k["name"].to_list() == ["gemm_a", "old", "norm", "new"]
    top = k.row(0, named=True)
    assert (top["a_count"], top["b_count"], top["a_total_us"], top["b_total_us"], top["delta_us"]) == (2, 2, 6.0, 3.0, -3.0)
    assert top["a_share_prefill"] == pytest.approx(5 / 6) and top["b_share_decode"] == pytest.approx(1 / 3)
    assert dict(zip(k["name"], k["presence"])) == {"gemm_a": "both", "old": "only_a", "norm": "both", "new": "only_b"}
    assert k["share_of_change"].sum() == pytest.approx(1.0)
    cats = category_diff(k)
    assert dict(zip(cats["category"], cats["delta_us"])) == pytest.approx({"gemm": -3.0, "other": -0.25, "norm": 0.1})


def test_normalize_merges_template_variants():
    a = _ops([("void k<float, 4>(float*, int)", "elementwise", "decode", 1000, 1000),
              ("void k<half, 8>(half*, int)", "elementwise", "decode", 3000, 3000)])
    assert kernel_diff(a, a).height == 2
    merged = kernel_diff(a, a, normalize=True)
    assert merged.select("name", "a_count", "a_total_us", "variants").rows() == [("k<>", 2, 4.0, 2)]


@pytest.mark.parametrize("raw, normalized", [
    ("triton_poi_fused_add_mul_3", "triton_poi_fused_add_mul"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn"),
    ("void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64, 64, 4, false, false, cutlass::bfloat16_t>, false>(Flash_fwd_params)", "flash_fwd_kernel<>"),
    ("Memset (Device)", "Memset (Device)"),
    ("ProfilerStep#1009", "ProfilerStep#"),
    ("kernel_at_0x7f3a2b", "kernel_at_0x"),
])
def test_normalize_examples(raw, normalized):
    assert normalize_kernel_name(raw) == normalized


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab_<>(), 0123x#[]:void", max_size=40))
def test_normalize_is_idempotent_and_never_empty(name):
    once = normalize_kernel_name(name)
    assert normalize_kernel_name(once) == once
    assert once or not name


def test_cpu_self_time_against_a_naive_nesting():
    rng = np.random.default_rng(0)
    rows = []
    def tree(start, end, depth):  # properly nested ops, as a profiler records them
        t = start
        while depth < 4:
            s = t + int(rng.integers(0, 4))
            if s >= end - 1:
                break
            e = s + int(rng.integers(1, max(1, (end - s) // 2) + 1))
            if (s, e) == (start, end) or e > end:
                break
            rows.append((s, e))
            tree(s, e, depth + 1)
            t = e
    tree(0, 600, 0)
    ops = pl.DataFrame({"pid": 1, "tid": 1, "start_ns": [s for s, _ in rows], "end_ns": [e for _, e in rows]})
    ops = ops.with_columns(dur_ns=pl.col("end_ns") - pl.col("start_ns"))
    got = cpu_self_ns(ops).to_list()
    # naive: own time = duration minus the durations of the direct children
    def contains(p, c):
        return p != c and rows[p][0] <= rows[c][0] and rows[c][1] <= rows[p][1]
    for i in range(len(rows)):
        kids = [c for c in range(len(rows)) if contains(i, c)
                and not any(contains(i, m) and contains(m, c) for m in range(len(rows)))]
        assert got[i] == (rows[i][1] - rows[i][0]) - sum(rows[c][1] - rows[c][0] for c in kids)
    assert len(rows) > 20
