"""The two supported transformers lines: what differs is handled in one place
(molmo_latency.transformers_lines), and both ends work (CI runs this file on 4.51.3 and on 5.x)."""

from __future__ import annotations

import pytest
import torch
import transformers

from molmo_latency import knobs
from molmo_latency.adapters import find_phases
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.transformers_lines import check_version, dtype_kwargs, is_4x

LINE_4 = transformers.__version__.startswith("4.")


@pytest.mark.parametrize("version", ["4.51.3", "4.57.1", "5.0.0", "5.23.0"])
def test_supported_versions_pass(version):
    assert check_version(version) == version


@pytest.mark.parametrize("version", ["4.50.2", "4.38.0", "6.0.0", "3.5.1"])
def test_unsupported_versions_are_one_line_naming_version_and_range(version):
    with pytest.raises(MolmoLatencyError) as err:
        check_version(version)
    message = str(err.value)
    assert version in message and ">=4.51,<6" in message and "\n" not in message


def test_from_pretrained_dtype_keyword_per_line():
    assert dtype_kwargs(torch.bfloat16, "4.51.3") == {"torch_dtype": torch.bfloat16}
    assert dtype_kwargs(torch.bfloat16, "5.23.0") == {"dtype": torch.bfloat16}
    assert dtype_kwargs(None, "5.23.0") == {}


def test_installed_line_is_the_one_detected():
    assert is_4x() == LINE_4


def test_reference_model_layout_on_the_installed_line(tiny):
    spans = find_phases(tiny.model).describe()
    if LINE_4:  # language_model is a whole OlmoeForCausalLM, decoder at language_model.model
        # the LLM phase: the decoder (get_decoder()) through the LM head (get_output_embeddings())
        assert spans["llm"] == ("language_model.model", "language_model.lm_head")
        assert spans["vision"] == ("vision_tower", "vision_tower")
        decoder = tiny.model.language_model.model
    else:       # decoder at model.language_model, lm_head on the outer model
        assert spans["llm"] == ("model.language_model", "lm_head")
        assert spans["vision"] == ("model.vision_tower", "model.vision_tower")
        decoder = tiny.model.model.language_model
    assert knobs._block_list(tiny.model) == (decoder, "layers")


def test_local_directory_loads_in_the_requested_dtype(tiny, tmp_path):
    """from_pretrained gets the keyword this line understands (4.5x: torch_dtype, 5.x: dtype)."""
    from molmo_latency.sweep.source import open_source

    tiny.model.save_pretrained(tmp_path / "m")
    source = open_source(str(tmp_path / "m"), dtype="bf16")
    assert next(source.model.parameters()).dtype == torch.bfloat16
    assert source.autocast_dtype is None  # a plain model is cast, not autocast


def test_cli_on_an_unsupported_line_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    from molmo_latency.cli.main import main

    from molmo_latency import transformers_lines

    monkeypatch.setattr(transformers_lines, "installed_version", lambda: "4.44.2")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "transformers 4.44.2 is not supported" in errors[0] and ">=4.51,<6" in errors[0]
    assert "Traceback" not in err and not (tmp_path / "demo").exists()
