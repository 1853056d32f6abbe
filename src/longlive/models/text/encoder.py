"""Prompt -> UMT5 embedding, shaped as the DiT's cross-attention context `[N, text_len, 4096]`.

Follows spec 1.1: clean, tokenize to `text_len` (512) with truncation and special tokens, run the
encoder with the attention mask and set the outputs at padded positions to exactly zero. Identical
prompts are encoded once, and the encoder can be moved off the GPU between prompt switches.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from longlive.models.text.cleaning import clean_prompt
from longlive.models.text.umt5 import hub_offline, load_umt5_encoder

logger = logging.getLogger(__name__)

TEXT_LEN = 512


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the tokenizer from a local folder (e.g. `google/umt5-xxl/`); never from a hub."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {path} does not exist; expected the local `google/umt5-xxl/` folder "
            "of the Wan2.2-TI2V-5B download (nothing is fetched at run time)"
        )
    with hub_offline():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class TextEncoder:
    """UMT5 encoder plus tokenizer producing zero-padded prompt embeddings for the DiT."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device = "cpu",
        text_len: int = TEXT_LEN,
        batch_size: int = 8,
        offload_after_encode: bool = False,
    ) -> None:
        if text_len < 1 or batch_size < 1:
            raise ValueError(f"text_len and batch_size must be >= 1, got {text_len} and {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.text_len = text_len
        self.batch_size = batch_size
        self.offload_after_encode = offload_after_encode

    @classmethod
    def from_pretrained(
        cls,
        path_or_folder: str | os.PathLike[str],
        tokenizer_path: str | os.PathLike[str],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        config_overrides: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> "TextEncoder":
        """Load weights (HF folder or Wan `.pth`) and tokenizer from local paths; see `load_umt5_encoder`."""
        model = load_umt5_encoder(path_or_folder, dtype=dtype, device=device, config_overrides=config_overrides)
        return cls(model, load_tokenizer(tokenizer_path), device=device, **kwargs)

    @property
    def dim(self) -> int:
        """Embedding width (4096 for umT5-XXL)."""
        return int(self.model.config.d_model)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the encoder weights and of the returned embeddings."""
        return next(self.model.parameters()).dtype

    def offload(self, to: str | torch.device = "cpu") -> None:
        """Move the encoder weights to `to` (CPU) to free accelerator memory; `encode` moves them back."""
        self.model.to(to)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("text encoder offloaded to %s", to)

    def _ensure_on_device(self) -> None:
        weight = next(self.model.parameters())
        if weight.device != self.device and not (
            self.device.type == weight.device.type and self.device.index is None
        ):
            logger.info("moving text encoder from %s back to %s", weight.device, self.device)
            self.model.to(self.device)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenize to `[N, text_len]` ids and mask; logs how many prompts were truncated."""
        return self._tokenize_cleaned([clean_prompt(p) for p in prompts])

    def _tokenize_cleaned(self, cleaned: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Cleaning is not idempotent (double html-unescape), so it is applied exactly once, by callers.
        lengths = [len(ids) for ids in self.tokenizer(cleaned, add_special_tokens=True)["input_ids"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.text_len]
        if too_long:
            logger.warning(
                "%d prompt(s) exceed text_len=%d tokens and are truncated (index, tokens): %s",
                len(too_long), self.text_len, too_long[:10],
            )
        batch = self.tokenizer(
            cleaned,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Encode prompts to `[N, text_len, dim]`; padded positions are exactly zero.

        Prompts that are identical after cleaning are run once. Each batch is cut to its longest
        prompt before the encoder (relative attention with a mask makes this exact) and re-padded.
        """
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single str; wrap it in a list")
        if len(prompts) == 0:
            raise ValueError("encode got an empty prompt list")
        cleaned = [clean_prompt(p) for p in prompts]
        unique: dict[str, int] = {}
        index = [unique.setdefault(text, len(unique)) for text in cleaned]
        texts = list(unique)
        if len(texts) < len(cleaned):
            logger.debug("encoding %d unique of %d prompts", len(texts), len(cleaned))

        self._ensure_on_device()
        ids, mask = self._tokenize_cleaned(texts)
        out = torch.zeros(len(texts), self.text_len, self.dim, dtype=self.dtype, device=self.device)
        for start in range(0, len(texts), self.batch_size):
            b_ids = ids[start : start + self.batch_size].to(self.device)
            b_mask = mask[start : start + self.batch_size].to(self.device)
            length = int(b_mask.sum(dim=1).max())
            hidden = self.model(input_ids=b_ids[:, :length], attention_mask=b_mask[:, :length]).last_hidden_state
            hidden = hidden * b_mask[:, :length, None].to(hidden.dtype)
            out[start : start + len(b_ids), :length] = hidden
        if self.offload_after_encode:
            self.offload()
        return out[torch.tensor(index, device=out.device)]

    def encode_chunks(self, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Encode per-chunk prompts (one list per sample) to `[B, num_chunks, text_len, dim]`."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("encode_chunks expects a non-empty list of per-sample prompt lists")
        counts = [len(sample) if not isinstance(sample, str) else -1 for sample in prompts]
        if any(c <= 0 for c in counts) or len(set(counts)) != 1:
            raise ValueError(
                "encode_chunks needs one non-empty list of chunk prompts per sample, all of the same "
                f"length; got chunk counts {counts} (-1 marks a bare string)"
            )
        flat = [p for sample in prompts for p in sample]
        return self.encode(flat).unflatten(0, (len(prompts), counts[0]))
