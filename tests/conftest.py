"""Shared pytest fixtures. Keep them small and generic; append new ones below."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_tokenizer():
    """A 64-word whitespace tokenizer built in memory ("w0".."w60" plus specials): no download, no model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny():
    """The tiny 4-layer Llama (6 query / 2 KV heads, head dim 16) the calibration tests train encoders on."""
    from dashkv.models import tiny_model

    return tiny_model("llama", num_layers=4, num_q_heads=6, num_kv_heads=2, head_dim=16)
