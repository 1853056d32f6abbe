"""UMT5 text encoder: equality with transformers, Wan .pth key layout, zero padding, dedup, cleaning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from longlive.models.text import TextEncoder, clean_prompt, load_tokenizer, load_umt5_encoder, umt5_xxl_config

WORDS = "a cat dog runs on the beach at sunset red car city night rain snow <b> & fast slow".split()
TINY = dict(vocab_size=32, d_model=16, d_kv=4, num_heads=4, d_ff=24, num_layers=2)
TEXT_LEN = 24


def _hf_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent inverse of the documented Wan -> HF mapping (ecosystem notes, section 3)."""
    out = {"token_embedding.weight": state["shared.weight"], "norm.weight": state["encoder.final_layer_norm.weight"]}
    names = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    for key, value in state.items():
        if key.startswith("encoder.block."):
            _, _, idx, rest = key.split(".", 3)
            out[f"blocks.{idx}.{names[rest]}"] = value.clone()
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("umt5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")

    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(**{**umt5_xxl_config().to_dict(), **TINY})).eval()
    model.save_pretrained(root / "hf")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(_hf_to_wan(state), root / "wan_t5.pth")
    return {"root": root, "tokenizer": root / "tokenizer", "hf": root / "hf", "pth": root / "wan_t5.pth"}


PROMPTS = ["a cat runs on the beach", "red car  at\n night in the city rain", "dog", ""]


def test_cleaning_matches_spec() -> None:
    assert clean_prompt("  a\t\tcat \n runs  ") == "a cat runs"
    assert clean_prompt("&amp;lt;b&amp;gt; &amp; x") == "<b> & x"  # unescaped twice
    assert clean_prompt("cafÃ©") == "café"  # ftfy repairs mojibake


def test_xxl_config_geometry() -> None:
    cfg = umt5_xxl_config()
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers) == (
        256384, 4096, 10240, 64, 64, 24)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)
    assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act
    with pytest.raises(ValueError, match="unknown UMT5 config override"):
        umt5_xxl_config(hidden=3)


def test_matches_transformers_directly(assets: dict[str, Path]) -> None:
    enc = TextEncoder.from_pretrained(assets["hf"], assets["tokenizer"])  # default text_len 512
    got = enc.encode(PROMPTS)
    assert got.shape == (len(PROMPTS), 512, TINY["d_model"]) and got.dtype == torch.float32

    ref_model = UMT5EncoderModel.from_pretrained(str(assets["hf"])).eval()
    ref_tok = PreTrainedTokenizerFast.from_pretrained(str(assets["tokenizer"]))
    batch = ref_tok([clean_prompt(p) for p in PROMPTS], padding="max_length", truncation=True,
                    max_length=512, add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert batch["input_ids"][0, :7].tolist() == [3, 4, 6, 7, 8, 9, 1]  # words then </s>
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[~mask]) == 0  # padded positions exactly zero
    assert torch.count_nonzero(got[mask].abs().sum(-1)) == int(mask.sum())


def test_wan_pth_layout_gives_identical_outputs(assets: dict[str, Path]) -> None:
    hf = TextEncoder.from_pretrained(assets["hf"], assets["tokenizer"], text_len=TEXT_LEN)
    wan = TextEncoder.from_pretrained(assets["pth"], assets["tokenizer"], config_overrides=TINY, text_len=TEXT_LEN)
    assert wan.model.shared.weight is wan.model.encoder.embed_tokens.weight  # tied, one copy
    assert torch.equal(hf.encode(PROMPTS), wan.encode(PROMPTS))


def test_pth_with_wrong_config_names_the_file(assets: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="wan_t5.pth.*does not match"):
        load_umt5_encoder(assets["pth"], config_overrides={**TINY, "num_layers": 3})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_umt5_encoder(assets["root"] / "google" / "umt5-xxl-missing.pth")
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        load_tokenizer("google/umt5-xxl")  # a hub id is never fetched


def test_bf16_load(assets: dict[str, Path]) -> None:
    model = load_umt5_encoder(assets["pth"], dtype=torch.bfloat16, config_overrides=TINY)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_duplicates_encoded_once_and_placed(assets: dict[str, Path]) -> None:
    enc = TextEncoder.from_pretrained(assets["hf"], assets["tokenizer"], text_len=TEXT_LEN, batch_size=2)
    rows: list[int] = []
    enc.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    chunks = [["a cat", "a  cat", "dog", "a cat"], ["dog", "red car", "red car", "a cat"]]
    got = enc.encode_chunks(chunks)
    assert got.shape == (2, 4, TEXT_LEN, TINY["d_model"])
    assert sum(rows) == 3  # "a cat" (two spellings clean to one), "dog", "red car"
    single = {p: enc.encode([p])[0] for p in ["a cat", "dog", "red car"]}
    for b, sample in enumerate(chunks):
        for c, prompt in enumerate(sample):
            torch.testing.assert_close(got[b, c], single[clean_prompt(prompt)], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk counts"):
        enc.encode_chunks([["a"], ["a", "b"]])


def test_truncation_logged_and_offload(assets: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    enc = TextEncoder.from_pretrained(assets["hf"], assets["tokenizer"], text_len=4, offload_after_encode=True)
    with caplog.at_level(logging.WARNING):
        out = enc.encode(["a cat runs on the beach", "dog"])
    assert "1 prompt(s) exceed text_len=4" in caplog.text
    assert out.shape == (2, 4, TINY["d_model"]) and torch.count_nonzero(out[1, 2:]) == 0
    enc.offload()
    assert all(p.device.type == "cpu" for p in enc.model.parameters())
    assert enc.encode(["dog"]).shape == (1, 4, TINY["d_model"])


@pytest.mark.gpu
def test_offload_frees_gpu(assets: dict[str, Path]) -> None:
    enc = TextEncoder.from_pretrained(assets["hf"], assets["tokenizer"], device="cuda", text_len=TEXT_LEN)
    assert enc.encode(["dog"]).device.type == "cuda"
    enc.offload()
    assert all(p.device.type == "cpu" for p in enc.model.parameters())
    assert enc.encode(["dog"]).device.type == "cuda"
