"""The profiler on the real MolmoE model code (../shared/molmo_remote, tiny random config from
tests/molmoe_fixtures.py): image tokens from image_input_idx, per row, through generate() and
generate_from_batch(). Skips where that code is absent or cannot run (it needs transformers 4.5x)."""

from __future__ import annotations

import pytest
import torch

from molmo_latency import profile_phases
from tests.molmoe_fixtures import TOKENS_PER_CROP, tiny_molmoe


@pytest.fixture(scope="module")
def molmoe():
    return tiny_molmoe()


def _batch(crops, rows_image_tokens, prompt_tokens=8):
    """Inputs for len(rows_image_tokens) rows of `crops` crops; row i receives only the first
    rows_image_tokens[i] image features (image_input_idx -1 for the rest)."""
    rows = len(rows_image_tokens)
    length = 1 + TOKENS_PER_CROP * crops + prompt_tokens
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(1, 1 + TOKENS_PER_CROP * crops).reshape(crops, TOKENS_PER_CROP)
    idx = idx.expand(rows, crops, TOKENS_PER_CROP).clone()
    for row, n in enumerate(rows_image_tokens):
        idx[row].view(-1)[n:] = -1
    return {"input_ids": torch.randint(3, 300, (rows, length), generator=gen),
            "images": torch.randn(rows, crops, 576, 588, generator=gen),
            "image_masks": torch.ones(rows, crops, 576),
            "image_input_idx": idx}


def _generation_config(new_tokens):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            use_cache=True, pad_token_id=1, eos_token_id=2)


def test_molmoe_image_tokens_from_image_input_idx_per_row(molmoe):
    full = 2 * TOKENS_PER_CROP
    one = _batch(2, [full])
    two = _batch(2, [full, 100])
    with profile_phases(molmoe) as prof, torch.inference_mode():
        molmoe.generate(**one, generation_config=_generation_config(3))
        molmoe.generate(**two, generation_config=_generation_config(3))
        molmoe.generate_from_batch(two, _generation_config(3))
    req = prof.report().requests
    assert req["valid"].all(), req["invalid_reason"].to_list()
    assert req["image_tokens_per_row"].to_list() == [[full], [full, 100], [full, 100]]
    assert req["image_tokens"].to_list() == [full, full, full]  # the widest row
    assert req["decode_steps"].to_list() == [2, 2, 2]
    assert req["output_tokens_per_row"].to_list() == [[3], [3, 3], [3, 3]]
    assert req["tokens_per_step"].to_list() == [1.0, 2.0, 2.0]
    assert "generate" not in vars(molmoe) and "generate_from_batch" not in vars(molmoe)
