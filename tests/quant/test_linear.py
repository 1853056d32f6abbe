"""NVFP4Linear (emulated W4A4 with the spec-7.4 backward, weight-only packed FP4), model conversion,
compact checkpoints and the NVFP4 export, on CPU with the reference numerics."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from longlive.cli.main import main
from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.lora import apply_lora, lora_state_dict
from longlive.models.wan.state_dict import NVFP4_FORMAT, TE_FORMAT, load_state_dict, save_generator
from longlive.io.checkpoint import write_torch
from longlive.quant import nvfp4 as nv
from longlive.quant.convert import compact_nbytes, prepare_compact_model, quantize_model, quantized_names
from longlive.quant.filters import NVFP4_DEFAULT_FILTERED, ModuleFilter, nvfp4_filter
from longlive.quant.linear import NVFP4Linear, NVFP4Recipe, backend_status, spec_dtypes

ROOT = Path(__file__).resolve().parents[2]
STATIC = NVFP4Recipe("static_6", "static_6", "static_6", stochastic_gradients=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _deq(x: torch.Tensor, rule: str, **kw) -> torch.Tensor:
    return nv.dequantize(nv.quantize(x, rule, **kw), x.dtype)


def _layer(recipe=STATIC, seed=0, n_in=64, n_out=48):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    return lin, NVFP4Linear.from_linear(lin, recipe)


def test_forward_is_quantized_activation_times_quantized_weight():
    for recipe in (STATIC, NVFP4Recipe("mse", "mse", "mse", weight_2d=False)):
        lin, q = _layer(recipe)
        x = torch.randn(3, 5, 64)
        want = _deq(x.reshape(15, 64), recipe.activation_rule) @ _deq(lin.weight.detach(), recipe.weight_rule,
                                                                      block_2d=recipe.weight_2d).t()
        want = (want + lin.bias).reshape(3, 5, 48)
        assert torch.equal(q(x), want)
        assert 0.03 < _rel(q(x), lin(x)) < 0.25  # W4A4 on Gaussian data: about 0.14 measured


def test_backward_follows_spec_7_4_exactly_with_nearest_rounding():
    recipe = NVFP4Recipe("static_6", "mse", "static_6", weight_2d=True, stochastic_gradients=False)
    lin, q = _layer(recipe)
    x = torch.randn(20, 64, requires_grad=True)  # 20 tokens: not a multiple of 16, so the wgrad pads
    g = torch.randn(20, 48)
    q(x).backward(g)
    w_q = _deq(lin.weight.detach(), "mse", block_2d=True)
    assert torch.equal(x.grad, _deq(g, "static_6") @ w_q)
    x_q = _deq(x.detach(), "static_6")
    gt = nv.hadamard_transform(torch.nn.functional.pad(g.t(), (0, 12)))
    xt = nv.hadamard_transform(torch.nn.functional.pad(x_q.t(), (0, 12)))
    want_w = _deq(gt, "static_6") @ _deq(xt, "static_6").t()
    torch.testing.assert_close(lin.weight.grad, want_w, rtol=1e-6, atol=1e-6)
    assert torch.allclose(lin.bias.grad, g.sum(0))


def test_quantized_gradients_approximate_the_exact_ones():
    lin, q = _layer(NVFP4Recipe("mse", "mse", "mse"))
    ref = copy.deepcopy(lin)
    x = torch.randn(64, 64)
    g = torch.randn(64, 48)
    xq, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    q(xq).backward(g)
    ref(xr).backward(g)
    assert _rel(xq.grad, xr.grad) < 0.25 and _rel(lin.weight.grad, ref.weight.grad) < 0.3


def test_stochastic_gradient_is_unbiased_on_average():
    lin, q = _layer(NVFP4Recipe("static_6", "static_6", "static_6", weight_2d=True, wgrad_hadamard=False))
    x = torch.randn(16, 64, requires_grad=True)
    g = torch.randn(16, 48)
    torch.manual_seed(0)
    grads = []
    for _ in range(300):
        x.grad = None
        q(x).backward(g)
        grads.append(x.grad.clone())
    mean = torch.stack(grads).mean(0)
    exact = g @ _deq(lin.weight.detach(), "static_6", block_2d=True)  # E[Q_sr(g)] = g
    single = _rel(grads[0], exact)
    assert _rel(mean, exact) < single / 5


def test_2d_weight_blocks_make_w_and_wt_identical():
    _, q = _layer(NVFP4Recipe("mse", "mse", "mse", weight_2d=True), n_in=64, n_out=64)
    torch.testing.assert_close(q.dequantized_weight_t(torch.float32).t(), q.dequantized_weight(torch.float32), rtol=0, atol=0)
    wt = _deq(q.weight.detach().t().contiguous(), "mse", block_2d=True)
    assert torch.equal(q.dequantized_weight_t(torch.float32), wt)


def test_materialized_layer_state_dict_round_trip_and_dtype_safety():
    lin, q = _layer(NVFP4Recipe("mse", "mse", "mse", weight_2d=False))
    x = torch.randn(4, 64)
    before = q(x)
    q.materialize()
    assert q.weight is None and torch.equal(q(x), before)
    sd = spec_dtypes(q.state_dict())
    assert {k: v.dtype for k, v in sd.items()} == {
        "bias": torch.float32, "quantized_weight_values": torch.uint8, "quantized_weight_scale_factors": torch.float8_e4m3fn,
        "quantized_weight_amax": torch.float32, "quantized_weight_metadata": torch.int32}
    assert sd["quantized_weight_metadata"].tolist() == [48, 64, 128, 64]
    fresh = NVFP4Linear.from_linear(nn.Linear(64, 48), q.recipe)
    fresh.prepare_materialized(torch.device("cpu"))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), before)
    cast = fresh.to(torch.float64)  # casting the model must not touch the packed buffers (bf16 alike)
    assert cast.quantized_weight_amax.dtype == torch.int32 and cast.quantized_weight_scale_factors.dtype == torch.uint8
    torch.testing.assert_close(cast(x.double()).float(), before, rtol=1e-5, atol=1e-5)
    wrong = NVFP4Linear.from_linear(nn.Linear(64, 48), q.recipe)
    wrong.prepare_materialized(torch.device("cpu"))
    bad = dict(sd, quantized_weight_metadata=torch.tensor([48, 64, 256, 64], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="metadata"):
        wrong.load_state_dict(bad)


def test_weight_only_backend_is_bf16_activation_times_fp4_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = NVFP4Linear.from_linear(lin, STATIC.for_inference(), backend="weight_only")
    q.materialize()
    x = torch.randn(7, 64)
    assert torch.equal(q(x), x @ _deq(lin.weight.detach(), "static_6").t() + lin.bias)


def test_lora_trains_on_a_materialized_fp4_base():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny"))
    quantize_model(model, NVFP4Recipe("mse", "mse", "mse", weight_2d=False), nvfp4_filter(None), materialize=True,
                   transposed=True)
    apply_lora(model, rank=4, alpha=4)  # PEFT wraps each NVFP4 layer as its base layer
    wrapped = model.blocks[0].ffn[0]
    assert isinstance(wrapped.get_base_layer(), NVFP4Linear) and wrapped.get_base_layer().weight is None
    for m in model.modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    model.requires_grad_(False)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    x, t, ctx = _tiny_inputs()
    model(x, t, ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_model_conversion_counts_filters_and_lora_refusal():
    with torch.device("meta"):
        big = WanModel(WanConfig.preset("wan2.2-ti2v-5b"))
    names = quantize_model(big, STATIC, nvfp4_filter(None))
    assert len(names) == 300 and all(n.startswith("blocks.") for n in names)
    assert len(quantized_names(big)) == 300
    torch.manual_seed(0)
    tiny = WanModel(WanConfig.preset("tiny"))
    custom = ModuleFilter.from_list(list(NVFP4_DEFAULT_FILTERED) + ["re:blocks\\.1\\..*", "blocks.0.ffn.2"])
    names = quantize_model(copy.deepcopy(tiny), STATIC, custom)
    assert len(names) == 9 and "blocks.0.ffn.2" not in names
    with pytest.raises(ValueError, match="LoRA merged first"):
        quantize_model(apply_lora(copy.deepcopy(tiny), rank=2, alpha=2), STATIC, nvfp4_filter(None))
    with pytest.raises(ValueError, match="invalid regular expression"):
        nvfp4_filter(["re:blocks.(("])


def _tiny_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, 8, 4, 4, generator=g)
    t = torch.full((1, 8), 500.0)
    ctx = torch.randn(1, 16, 32, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("backend,recipe,bound", [
    ("emulated", NVFP4Recipe("mse", "mse", "mse", weight_2d=False), 0.2),
    ("emulated", NVFP4Recipe("static_6", "static_6", "static_6", weight_2d=False), 0.2),
    ("weight_only", NVFP4Recipe("mse", "mse", "mse", weight_2d=False), 0.12),
])
def test_tiny_model_output_stays_close_to_full_precision(backend, recipe, bound):
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny")).eval()
    x, t, ctx = _tiny_inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        quantize_model(model, recipe, nvfp4_filter(None), backend=backend, materialize=True)
        out = model(x, t, ctx)
    err = _rel(out, ref)
    assert 0.0 < err < bound  # measured: about 0.06-0.08 (W4A4) and 0.03 (weight only) on random weights


def test_compact_checkpoint_round_trip_through_save_generator(tmp_path):
    torch.manual_seed(0)
    recipe = NVFP4Recipe("mse", "mse", "mse", weight_2d=False)
    model = WanModel(WanConfig.preset("tiny")).eval()
    quantize_model(model, recipe, nvfp4_filter(None), materialize=True)
    path = save_generator(spec_dtypes(model.state_dict()), tmp_path / "m.safetensors",
                          metadata={"checkpoint_format": NVFP4_FORMAT})
    with pytest.raises(Exception, match="compact NVFP4"):
        load_state_dict(path)
    sd, meta = load_state_dict(path, allow_nvfp4=True)
    assert meta["checkpoint_format"] == NVFP4_FORMAT
    assert sd["blocks.0.ffn.0.quantized_weight_scale_factors"].dtype == torch.float8_e4m3fn
    with torch.device("meta"):
        fresh = WanModel(WanConfig.preset("tiny"))
    prepare_compact_model(fresh, recipe, nvfp4_filter(None))
    fresh.load_state_dict(sd, strict=True, assign=True)
    x, t, ctx = _tiny_inputs(1)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, ctx), model(x, t, ctx))
    packed, dense = compact_nbytes(model)
    assert dense / packed > 1.9  # tiny layers pad their 64 rows to 128
    big = nn.Sequential(nn.Linear(1024, 256))  # no padding, as at the 5B shapes: 9/16 byte per weight
    quantize_model(big, recipe, ModuleFilter.from_list([]), materialize=True)
    packed, dense = compact_nbytes(big)
    assert packed == 256 * 1024 * 9 // 16 + 20 and round(dense / packed, 2) == 3.56


def test_unavailable_backends_say_why():
    ok, why = backend_status("transformer_engine", torch.device("cpu"))
    assert not ok and "compute capability 10" in why
    with pytest.raises(RuntimeError, match="not available"):
        quantize_model(WanModel(WanConfig.preset("tiny")), STATIC, nvfp4_filter(None), backend="fouroversix")
    with pytest.raises(ValueError, match="unknown NVFP4 backend"):
        backend_status("fp2")


def _cfg(tmp_path, extra=""):
    cfg = tmp_path / "q.yaml"
    cfg.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("random_weights: true", "random_weights: false")
                   + "\nadapter:\n  type: lora\n  rank: 4\n  alpha: 8\n  dropout: 0.0\n"
                   + "model_quant_scale_rule: mse\n" + extra)
    return cfg


def test_export_nvfp4_merges_the_lora_and_generate_loads_it(tmp_path):
    torch.manual_seed(0)
    base = save_generator(WanModel(WanConfig.preset("tiny")), tmp_path / "base.pt")
    lora = apply_lora(WanModel(WanConfig.preset("tiny")), rank=4, alpha=8)
    write_torch({"generator_lora": {k: torch.randn_like(v) * 0.2 for k, v in lora_state_dict(lora).items()},
                 "critic_lora": {}, "step": 1}, tmp_path / "lora.pt")
    cfg = _cfg(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    small = ["data.image_or_video_shape=[1,16,48,2,2]", "model_kwargs.local_attn_size=16", "inference.sink_size=0",
             f"data.data_path={prompts}", "inference.save_latents_only=true", "--no-progress"]
    common = ["--config", str(cfg), "--generator-ckpt", str(base)]
    assert main(["export", "nvfp4", *common, "--output-path", str(tmp_path / "q.pt"), "--backend", "fouroversix",
                 "--lora-ckpt", str(tmp_path / "lora.pt"), "--device", "cpu"]) == 0
    assert main(["export", "nvfp4", *common, "--output-path", str(tmp_path / "nolora.pt"), "--backend", "fouroversix",
                 "--device", "cpu"]) == 0
    assert main(["export", "nvfp4", *common, "--output-path", str(tmp_path / "te.pt"), "--backend", "transformer_engine",
                 "--lora-ckpt", str(tmp_path / "lora.pt"), "--device", "cpu"]) == 0
    obj = torch.load(tmp_path / "q.pt", weights_only=True)
    assert obj["checkpoint_format"] == NVFP4_FORMAT and obj["merged_lora"] is True
    assert obj["quantization"]["weight_scale_rule"] == "mse"
    assert torch.load(tmp_path / "te.pt", weights_only=True)["checkpoint_format"] == TE_FORMAT

    def run(name, *over):
        assert main(["generate", "--config", str(cfg), "--output-folder", str(tmp_path / name), *small,
                     "adapter=null", *over]) == 0
        return torch.load(next((tmp_path / name).glob("*.pt")), weights_only=True)["latents"]

    compact = run("c", f"checkpoints.generator_ckpt={tmp_path / 'q.pt'}", "model_quant=true")
    runtime = run("r", f"checkpoints.generator_ckpt={tmp_path / 'te.pt'}", "model_quant=true")
    unmerged = run("u", f"checkpoints.generator_ckpt={tmp_path / 'nolora.pt'}", "model_quant=true")
    assert torch.equal(compact, runtime)  # quantizing at load == loading the quantized export
    assert not torch.allclose(compact, unmerged, atol=1e-3)  # the LoRA is in the export
    with pytest.raises(Exception, match="model_quant"):
        run("x", f"checkpoints.generator_ckpt={tmp_path / 'q.pt'}")
    with pytest.raises(Exception, match="weight scale rule"):
        run("y", f"checkpoints.generator_ckpt={tmp_path / 'q.pt'}", "model_quant=true", "model_quant_scale_rule=static_6")
