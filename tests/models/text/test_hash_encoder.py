"""The weight-free hash text encoder of the tiny and synth presets."""
from __future__ import annotations

import torch

from longlive.models.text.small import HashTextEncoder


def test_tokens_are_word_vector_plus_position_and_padding_is_zero() -> None:
    enc = HashTextEncoder(16, 6, seed=3)
    out = enc.encode(["Red circle", "red  CIRCLE!"])
    assert out.shape == (2, 6, 16)
    torch.testing.assert_close(out[0], out[1])  # cleaning and lower-casing
    torch.testing.assert_close(out[0, 0], enc.word_vector("red") + enc._positions[0])
    torch.testing.assert_close(out[0, 1], enc.word_vector("circle") + enc._positions[1])
    assert out[0, 2:].abs().sum() == 0
    assert not torch.equal(HashTextEncoder(16, 6, seed=4).encode(["red"]), enc.encode(["red"]))
    chunks = enc.encode_chunks([["red circle", "blue"], ["blue", "red circle"]])
    torch.testing.assert_close(chunks[0, 0], out[0])
    torch.testing.assert_close(chunks[1, 1], out[0])
    torch.testing.assert_close(chunks[0, 1], chunks[1, 0])
