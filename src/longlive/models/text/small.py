"""A small deterministic text encoder that needs no weights files: for tiny configs and CPU demos.

Each lower-cased word maps to a fixed pseudo-random vector (seeded by a stable hash of the word and
the encoder's seed) plus a sinusoidal position code, so equal prompts give equal embeddings on every
machine and different words are distinguishable. Output layout matches `TextEncoder`:
`[N, text_len, dim]` with padded positions exactly zero.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Sequence

import logging

import torch

from .cleaning import clean_prompt

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+")


class HashTextEncoder:
    """Bag-of-words-with-positions encoder: deterministic, weight-free, same API as `TextEncoder`."""

    def __init__(self, dim: int, text_len: int, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if dim < 2 or text_len < 1:
            raise ValueError(f"HashTextEncoder needs dim >= 2 and text_len >= 1, got {dim} and {text_len}")
        self.dim, self.text_len, self.seed = dim, text_len, seed
        self._warned: set[str] = set()
        self._vectors: dict[str, torch.Tensor] = {}
        self.device, self._dtype = torch.device(device), dtype
        pos = torch.arange(text_len, dtype=torch.float64)[:, None]
        freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        pe = torch.zeros(text_len, dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
        self._positions = (0.1 * pe).float()

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def word_vector(self, word: str) -> torch.Tensor:
        vec = self._vectors.get(word)
        if vec is None:  # one generator per new word; training re-encodes the same few words every step
            digest = hashlib.blake2b(f"{self.seed}:{word}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            vec = self._vectors[word] = torch.randn(self.dim, generator=g) / math.sqrt(self.dim) * 4
        return vec

    def words(self, prompt: str) -> list[str]:
        words = _WORD.findall(clean_prompt(prompt).lower())
        if len(words) > self.text_len and prompt not in self._warned:
            self._warned.add(prompt)  # once per prompt, not on every step of a training run
            log.warning("prompt of %d words truncated to text_len=%d: %.60s...", len(words), self.text_len, prompt)
        return words[: self.text_len]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("encode expects a non-empty list of prompts")
        out = torch.zeros(len(prompts), self.text_len, self.dim)
        for i, prompt in enumerate(prompts):
            words = self.words(prompt)
            if words:
                out[i, : len(words)] = torch.stack([self.word_vector(w) for w in words]) + self._positions[: len(words)]
        return out.to(self.device, self._dtype)

    def encode_chunks(self, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        counts = {len(p) for p in prompts}
        if len(prompts) == 0 or len(counts) != 1 or 0 in counts:
            raise ValueError(f"encode_chunks needs one non-empty list of chunk prompts per sample, equal lengths; got {sorted(counts)}")
        flat = [p for sample in prompts for p in sample]
        unique = {p: i for i, p in enumerate(dict.fromkeys(flat))}
        enc = self.encode(list(unique))
        return enc[torch.tensor([unique[p] for p in flat])].unflatten(0, (len(prompts), len(prompts[0])))

    def offload(self, to: str | torch.device = "cpu") -> None:
        """Nothing to move: the encoder holds no weights."""
