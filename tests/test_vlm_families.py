"""Every image-text family we can build here, profiled with no arguments.

Each family is a tiny random model built from its own config class (tests/vlm_families.py). The
test hooks the family's modules ITSELF (its own reading of the modeling code: ``Family.own``),
on the same clock as the CPU timer (``time.perf_counter_ns``), and checks that each phase the
profiler reports is the same module call: the profiler's hooks run right after the test's own
(registered first), so for every instance ``own start <= phase start <= own end <= phase end``
and the phase ends before the next own call starts. Output and image tokens come from the
request the test built; the model must be exactly as before (hooks, instance attributes,
generate() output).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
import torch

from molmo_latency import profile_phases
from molmo_latency.adapters import get_module
from tests.vlm_families import EOS, FAMILIES, PAD, Family

NEW_TOKENS = 4


def _installed_line() -> str:
    import transformers

    return transformers.__version__.split(".")[0]


def _params() -> list:
    line = _installed_line()
    out = []
    for fam in FAMILIES:
        marks = [pytest.mark.slow] if fam.slow else []
        if fam.skip:
            marks.append(pytest.mark.skip(reason=fam.skip))
        elif line not in fam.lines:
            marks.append(pytest.mark.skip(reason=f"{fam.cls} is tested on transformers {'/'.join(fam.lines)}.x"))
        out.append(pytest.param(fam, id=fam.name, marks=marks))
    return out


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything profiling could leave behind: hooks and instance attributes of every module."""
    state = {}
    for name, m in model.named_modules():
        state[name] = (
            tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(m._backward_hooks),
            tuple(sorted(k for k in vars(m) if not k.startswith("_") or k.startswith("_molmo"))),
            tuple(id(v) for k, v in sorted(vars(m).items()) if callable(v) and not isinstance(v, torch.nn.Module)),
        )
    return state


class OwnHooks:
    """The test's own hooks: for each phase, the (start_ns, end_ns) of every call of its modules."""

    def __init__(self, model: torch.nn.Module, own: dict[str, Any]):
        self.model, self.own = model, own
        self.calls: dict[str, list[list[int]]] = {}
        self.handles: list[Any] = []
        self.methods: list[tuple[torch.nn.Module, str]] = []
        self.inner: set[str] = set()

    def _method(self, phase: str, path: str) -> None:
        """Wrap a method (an image tokenizer's encode()) on the instance; put back on exit."""
        owner_path, _, name = path.rpartition(".")
        owner = get_module(self.model, owner_path)
        original = getattr(owner, name)
        calls = self.calls.setdefault(phase, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            calls.append([time.perf_counter_ns(), -1])
            out = original(*args, **kwargs)
            calls[-1][1] = time.perf_counter_ns()
            return out

        object.__setattr__(owner, name, timed)
        self.methods.append((owner, name))
        self.inner.add(phase)  # installed before the profiler's wrapper: runs inside it

    def _pair(self, phase: str, start: torch.nn.Module, end: torch.nn.Module) -> None:
        calls = self.calls.setdefault(phase, [])
        self.handles.append(start.register_forward_pre_hook(
            lambda *_: calls.append([time.perf_counter_ns(), -1])))

        def done(*_: Any) -> None:
            calls[-1][1] = time.perf_counter_ns()

        self.handles.append(end.register_forward_hook(done))

    def __enter__(self) -> "OwnHooks":
        for phase, spec in self.own.items():
            if isinstance(spec, str) and spec.startswith("inside:"):
                module = get_module(self.model, spec.split(":", 1)[1])
                assert module is not None, spec
                self._pair("projector_inside", module, module)
            elif isinstance(spec, tuple):
                start, end = get_module(self.model, spec[0]), get_module(self.model, spec[1])
                assert start is not None and end is not None, spec
                self._pair(phase, start, end)
            else:
                for path in spec:
                    module = get_module(self.model, path)
                    if module is None:
                        self._method(phase, path)
                    else:
                        self._pair(phase, module, module)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        for owner, name in self.methods:
            object.__delattr__(owner, name)

    def intervals(self, phase: str) -> list[list[int]]:
        return sorted(self.calls.get(phase, []))


def _same_calls(phase: str, own: list[list[int]], rows: list[dict], after: list[int],
                inner: bool = False) -> None:
    """Each profiler instance is the same call as the own hook's: the profiler's hooks run right
    after the test's (or, for a wrapped method, around them: `inner`)."""
    assert len(rows) == len(own), f"{phase}: profiler has {len(rows)} instances, own hooks saw {len(own)}"
    for i, ((t0, t1), row) in enumerate(zip(own, rows)):
        assert t1 > 0, f"{phase}[{i}] never ended in the test's own hooks"
        if inner:
            assert row["start_ns"] <= t0 <= t1 <= row["end_ns"], (phase, i, t0, t1, row)
        else:
            assert t0 <= row["start_ns"] <= t1 <= row["end_ns"], (phase, i, t0, t1, row)
        later = [t for t in after if t > t1]
        if later:
            assert row["end_ns"] <= min(later), f"{phase}[{i}] ends after the next module call began"


def profile_family(fam: Family):
    model, inputs = fam.build()
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if not fam.sets_token_ids:
        kw.update(pad_token_id=PAD, eos_token_id=EOS)
    with torch.no_grad():
        try:
            expected = model.generate(**inputs, **kw)  # also the warm-up
        except Exception as e:
            if fam.fails_upstream is None:
                raise
            first = (str(e).splitlines() or [""])[0][:200]
            pytest.skip(f"{fam.cls}.generate() fails here without the profiler ({fam.fails_upstream}): "
                        f"{type(e).__name__}: {first}")
    before = model_state(model)
    with OwnHooks(model, fam.own_on(_installed_line())) as own, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with profile_phases(model) as prof, torch.no_grad():
            out = model.generate(**inputs, **kw)
    return model, expected, out, before, own, prof.report(), caught


@pytest.mark.parametrize("fam", _params())
def test_family_phases_agree_with_own_hooks(fam: Family):
    model, expected, out, before, own, report, caught = profile_family(fam)
    own_map = fam.own_on(_installed_line())
    assert torch.equal(out, expected), "profiling changed what generate() returns"
    assert model_state(model) == before, "the model was left changed (hooks or attributes)"
    warned = [w for w in caught if "no projector found" in str(w.message)]
    if "projector" in own_map:
        assert not warned
    else:  # a family with no projector: said so, in a warning and in the row
        assert len(warned) == 1 and req_projector_inside(report) is None

    req = report.requests.row(0, named=True)
    assert req["valid"], req["invalid_reason"]
    assert req["output_tokens"] == NEW_TOKENS
    assert req["decode_steps"] == NEW_TOKENS - 1
    assert req["image_tokens"] == fam.image_tokens
    phases = report.phases.sort("start_ns").to_dicts()
    all_starts = sorted(t0 for calls in own.calls.values() for t0, _ in calls)

    for phase in ("vision", "projector"):
        rows = [r for r in phases if r["phase"] == phase]
        if isinstance(own_map.get(phase), str):  # the projector runs inside the vision module
            assert not rows and req["projector_inside_vision"] is True
            vision = own.intervals("vision")
            for p0, p1 in own.intervals("projector_inside"):
                assert any(v0 <= p0 and p1 <= v1 for v0, v1 in vision)
            continue
        _same_calls(phase, own.intervals(phase), rows, all_starts, inner=phase in own.inner)
    if "projector" in own_map and not isinstance(own_map["projector"], str):
        assert req["projector_inside_vision"] is False
    llm_rows = [r for r in phases if r["phase"] in ("prefill", "decode")]
    if fam.encoder_decoder:  # the encoder pass and the first decoder step are the prefill
        assert [r["phase"] for r in llm_rows] == ["prefill"] * 2 + ["decode"] * (NEW_TOKENS - 1)
        assert req["prefill_chunks"] == 2
        own_llm = sorted(own.intervals("encoder") + own.intervals("llm"))
    else:
        assert [r["phase"] for r in llm_rows] == ["prefill"] + ["decode"] * (NEW_TOKENS - 1)
        own_llm = own.intervals("llm")
    _same_calls("llm", own_llm, llm_rows, all_starts)


def req_projector_inside(report) -> Any:
    return report.requests["projector_inside_vision"][0]


def test_explicit_mapping_with_a_method_and_two_parts():
    """A mapping names a method (an image tokenizer's encode) and several parts per phase; each
    part's run is one instance; the method is put back afterwards."""
    from tests.vlm_families import by_name

    fam = by_name("chameleon")
    model, inputs = fam.build()
    kw = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    model.generate(**inputs, **kw)
    before = model_state(model)
    mapping = {"vision": ["model.vqmodel.encode", "model.vqmodel.quant_conv"],
               "llm": ("model.layers.0", "lm_head")}
    with profile_phases(model, phases=mapping) as prof:
        model.generate(**inputs, **kw)
    assert "encode" not in vars(model.model.vqmodel) and model_state(model) == before
    phases = prof.report().phases.sort("start_ns")
    # encode() runs quant_conv inside it: the second part nests in the first, and the request
    # says so rather than summing both
    assert phases.filter(phases["phase"] == "vision").height == 2
    req = prof.report().requests.row(0, named=True)
    assert not req["valid"] and "nested phases" in req["invalid_reason"]


def test_a_model_that_fits_nothing_gets_the_mapping_it_needs():
    from transformers import LlamaConfig, LlamaForCausalLM

    from molmo_latency.errors import AdapterError

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(AdapterError) as info:
        profile_phases(model)
    message = str(info.value)
    assert "found the text decoder at 'model' but no vision module" in message
    assert "phases={'vision': 'path.to.vit'" in message and "\n" not in message


@pytest.mark.parametrize("where, expected", [
    ({"image_token_id": 7}, 7),
    ({"image_token_index": 8}, 8),
    ({"image_patch_id": 9}, 9),                                    # Molmo2 (aliased to image_token_id)
    ({"vision_config": {"image_token_id": 10}}, 10),               # an id kept in the vision config
    ({"text_config": {"image_token_index": 11}}, 11),
    ({"vocabulary_map": {"<image>": 12, "a": 3}}, 12),             # Chameleon
    ({"image_token_id": None, "vision_config": {"image_token_id": 13}}, 13),
    ({"video_token_index": 14}, 14),                                # a video-only model (InstructBLIP-Video)
    ({"image_token_id": 15, "video_token_id": 16}, 15),            # the image id first
    ({}, None),
])
def test_image_token_id_wherever_the_config_keeps_it(where, expected):
    from types import SimpleNamespace

    from molmo_latency.adapters import image_token_id

    cfg = SimpleNamespace(**{k: SimpleNamespace(**v) if k.endswith("_config") else v for k, v in where.items()})
    assert image_token_id(cfg) == expected


@pytest.mark.parametrize("model_type, cls, missing", [
    # UDOP's image patches are embedded inside its T5 encoder: no vision module of its own
    ("udop", "UdopForConditionalGeneration", "found the text decoder at 'decoder' but no vision module"),
    # PI0 (a robot policy) runs its VLM's vision tower inside the module that is its decoder
    ("pi0", "PI0ForConditionalGeneration", "runs inside the text decoder 'model' and no single block list"),
    # PI0.5 (transformers 5.25), the same layout: a PaliGemma VLM and an action expert under `model`,
    # actions from flow matching (sample_actions), no generate()
    ("pi05", "PI05ForConditionalGeneration", "runs inside the text decoder 'model' and no single block list"),
])
def test_a_family_discovery_cannot_tell_is_refused_in_one_line(model_type, cls, missing):
    import transformers

    from molmo_latency.errors import AdapterError
    from tests.vlm_families import tiny_config

    if not hasattr(transformers, cls):
        pytest.skip(f"{cls} is not in transformers {transformers.__version__}")
    model = getattr(transformers, cls)(tiny_config(model_type))
    before = model_state(model)
    with pytest.raises(AdapterError) as info:
        profile_phases(model)
    message = str(info.value)
    assert message.startswith(f"cannot find the phases of {cls}: ") and missing in message
    assert "\n" not in message and "phases=" in message
    assert model_state(model) == before


def test_a_generate_that_is_not_token_by_token_is_refused_in_one_line():
    """DiffusionGemma (transformers 5.25) generates by block diffusion: each canvas of tokens is
    denoised by whole-canvas decoder passes, so its decoder calls are no prefill and one decode step
    per new token. The test sees that itself (its own hook on the decoder: 2 passes for 8 tokens with
    one denoising step per canvas of 4), and the profiler refuses the model in one line, unchanged."""
    import transformers

    from molmo_latency.errors import MolmoLatencyError
    from tests.vlm_families import IMAGE, by_name, diffusion_gemma_config, prompt

    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        pytest.skip(f"DiffusionGemmaForBlockDiffusion is not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    model = transformers.DiffusionGemmaForBlockDiffusion(diffusion_gemma_config()).eval()
    passes = []
    handle = model.model.decoder.register_forward_pre_hook(lambda *_: passes.append(1))
    # a 6x6 grid of 8x8 patches pooled 3x3 into 4 image tokens, as for Gemma 4 (its vision tower)
    ids = prompt(4, start=[IMAGE + 1], end=[IMAGE + 2])
    image = {"pixel_values": torch.randn(1, 36, 3 * 8 * 8),
             "image_position_ids": torch.tensor([[[x, y] for y in range(6) for x in range(6)]])}
    with torch.no_grad():
        out = model.generate(input_ids=ids, **image, max_new_tokens=8, max_denoising_steps=1, pad_token_id=PAD,
                             eos_token_id=EOS)
    handle.remove()
    assert out.sequences.shape[1] - ids.shape[1] == 8 and len(passes) == 2  # 4 tokens per decoder pass
    before = model_state(model)
    with pytest.raises(MolmoLatencyError) as info:
        profile_phases(model)
    message = str(info.value)
    assert message.startswith("cannot profile DiffusionGemmaForBlockDiffusion.generate(): ")
    assert "DiffusionGemmaGenerationMixin.generate" in message and "entry_points=" in message
    assert "\n" not in message
    assert model_state(model) == before
    # inspect says so before anything is measured; a token-by-token model has no refusal
    from molmo_latency.cli.inspect_cmd import inspection

    assert inspection(model, "diffusion_gemma")["refused"] == message
    assert inspection(by_name("llava").build()[0], "llava")["refused"] is None
