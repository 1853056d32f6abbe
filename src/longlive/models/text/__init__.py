"""longlive.models.text: UMT5-XXL prompt encoder (transformers `UMT5EncoderModel`) and prompt cleaning."""

from longlive.models.text.cleaning import clean_prompt
from longlive.models.text.encoder import TEXT_LEN, TextEncoder, load_tokenizer
from longlive.models.text.umt5 import hub_offline, load_umt5_encoder, umt5_xxl_config, wan_t5_to_hf

__all__ = [
    "TEXT_LEN",
    "TextEncoder",
    "clean_prompt",
    "hub_offline",
    "load_tokenizer",
    "load_umt5_encoder",
    "umt5_xxl_config",
    "wan_t5_to_hf",
]
