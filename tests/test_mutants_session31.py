"""Slips in this session's code that every earlier test let through (mutation testing):
GPTConfig.attention_scale's own checks, GPT-Neo's config.json in and out, the local layers'
ring KV cache, the metrics rows a checkpoint keeps and SFT's step-0 restore from --model."""
import math

import pytest

from gptlab.model.gpt import GPTConfig

BASE = dict(vocab_size=97, context=64, n_layers=2, n_heads=4, d_model=32)


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, math.inf, math.nan, True, False, "1"])
def test_gptconfig_refuses_an_attention_scale_that_is_no_finite_number_above_0(scale):
    """A scale of 0 (every query attends evenly), an infinite one, a bool or a string is
    refused by GPTConfig itself (config.json's check covers loaded models alone): `0 <=`,
    `<= math.inf` and a dropped bool check each passed every test."""
    with pytest.raises(ValueError, match=r"attention_scale must be a finite number above 0 .*"
                                         + "not " + repr(scale).replace("'", ".")):
        GPTConfig(**BASE, attention_scale=scale)


@pytest.mark.parametrize("scale", [1, 1.0, 0.125, 1e-9, 1e9])
def test_gptconfig_takes_any_finite_attention_scale_above_0(scale):
    assert GPTConfig(**BASE, attention_scale=scale).attention_scale == scale
