"""The example sweeps in examples/ run as written: each is a valid sweep whose every knob value
its model can take (checked against the model, before anything is measured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from molmo_latency.models import PRESETS
from molmo_latency.sweep import load_sweep

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_every_preset_has_an_example_sweep():
    assert {p.name.removeprefix("sweep-").removesuffix(".toml") for p in EXAMPLES.glob("sweep-*.toml")} == set(PRESETS)


def test_the_tiny_example_is_accepted_by_the_tiny_model(tiny):
    from molmo_latency.sweep.source import open_source

    spec = load_sweep(EXAMPLES / "sweep-tiny.toml")
    source = open_source("tiny", device="cpu")
    source.check_configs(spec.configs())
    assert len(spec.configs()) == 3 * 2 * 2 * 2 and spec.protocol["repeats"] >= 8  # enough for diff


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_example_fits_its_presets_knob_ranges(name):
    spec = load_sweep(EXAMPLES / f"sweep-{name}.toml")
    preset = PRESETS[name]
    for config in spec.configs():
        assert config.top_k is None or 1 <= config.top_k <= preset.experts
        assert config.blocks is None or 1 <= config.blocks <= preset.text_layers
    assert len({c.new_tokens for c in spec.configs()}) >= 2  # fit can hold out N
