"""The FPS ceiling of one chunk (longlive.pipelines.ceiling): its accounting and the bench side by side."""
import json

import pytest
import torch

from longlive.cli.main import main
from longlive.models.wan import WanConfig
from longlive.pipelines.ceiling import CeilingShape, measure_ceiling


def test_5b_chunk_shape_is_the_specs() -> None:
    cfg = WanConfig.preset("wan2.2-ti2v-5b")
    s = CeilingShape.for_chunk(cfg, tokens_per_frame=880, chunk_frames=8, window_frames=32, steps=4)
    assert (s.tokens, s.kv_tokens, s.heads, s.head_dim, s.dim, s.ffn_dim, s.text_len, s.layers, s.forwards) == \
        (7040, 28160, 24, 128, 3072, 14336, 512, 30, 5)
    sp4 = CeilingShape.for_chunk(cfg, tokens_per_frame=880, chunk_frames=8, window_frames=32, steps=2, sp_size=4)
    assert (sp4.tokens, sp4.kv_tokens, sp4.heads, sp4.forwards) == (1760, 28160, 6, 3)
    with pytest.raises(ValueError, match="sp_size=5"):
        CeilingShape.for_chunk(cfg, tokens_per_frame=880, chunk_frames=8, window_frames=32, steps=4, sp_size=5)


def test_ceiling_adds_up_the_timed_calls() -> None:
    """With a timer that reports each call's output size, the chunk time is exactly the spec's sum."""
    cfg = WanConfig.preset("tiny")
    s = CeilingShape.for_chunk(cfg, tokens_per_frame=16, chunk_frames=4, window_frames=12, steps=2)

    def timer(fn):
        out = fn()
        return 1.0 if out is None else out.numel() * 1e-6  # the sustained chunk returns nothing

    r = measure_ceiling(s, torch.device("cpu"), torch.float32, pixel_frames_per_chunk=16, timer=timer)
    dd, ffn1, ffn2 = s.tokens * s.dim, s.tokens * s.ffn_dim, s.tokens * s.dim
    attn = cross = s.heads * s.tokens * s.head_dim  # attention outputs have the queries' shape
    layer = (6 * dd + ffn1 + ffn2 + attn + cross) * 1e-6
    assert r["layer_seconds"] == pytest.approx(layer)
    assert r["chunk_seconds"] == pytest.approx(layer * cfg.num_layers * 3)
    assert r["fps"] == pytest.approx(16 / (layer * cfg.num_layers * 3))
    assert r["self_attention_backend"] == "default" and r["shape"]["kv_tokens"] == 12 * 16


def test_sustained_ceiling_runs_every_call_of_the_chunk_back_to_back() -> None:
    """The sustained chunk makes the layer's 8 products and 2 attention calls for every layer and forward."""
    from collections import Counter

    from torch.overrides import TorchFunctionMode

    cfg = WanConfig.preset("tiny")
    s = CeilingShape.for_chunk(cfg, tokens_per_frame=16, chunk_frames=4, window_frames=12, steps=2)
    calls: list[Counter] = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls[-1][getattr(func, "__name__", str(func))] += 1
            return func(*args, **(kwargs or {}))

    def timer(fn):
        calls.append(Counter())
        with Count():
            fn()
        return 1e-3 * len(calls)  # the sustained chunk is timed last

    r = measure_ceiling(s, torch.device("cpu"), torch.float32, pixel_frames_per_chunk=16, timer=timer)
    chunk_calls = s.layers * s.forwards
    assert calls[-1]["matmul"] == 8 * chunk_calls
    assert calls[-1]["scaled_dot_product_attention"] == 2 * chunk_calls
    assert r["sustained_chunk_seconds"] == pytest.approx(1e-3 * len(calls))
    assert r["sustained_fps"] == pytest.approx(16 / r["sustained_chunk_seconds"])


def test_fp8_ceiling_without_scaled_mm_is_a_clear_error(monkeypatch) -> None:
    s = CeilingShape.for_chunk(WanConfig.preset("tiny"), tokens_per_frame=16, chunk_frames=4, window_frames=12, steps=2)
    with pytest.raises(ValueError, match="fp8 needs torch._scaled_mm"):
        measure_ceiling(s, torch.device("cpu"), torch.float32, quant="fp8")
    import longlive.pipelines.bench as bench

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the ceiling's quant was checked")

    monkeypatch.setattr(bench, "build_random_dit", no_build)  # refused before anything is built or generated
    with pytest.raises(ValueError, match="fp8 needs torch._scaled_mm"):
        main(["bench", "--preset", "tiny", "--height", "64", "--width", "64", "--device", "cpu", "--quant", "fp8", "--ceiling"])


def test_bench_reports_the_ceiling_beside_the_loop(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    args = ["bench", "--preset", "tiny", "--height", "64", "--width", "64", "--device", "cpu", "--chunk-frames", "4",
            "--window", "12", "--sink", "4", "--chunks", "4", "--steps", "2", "--decode", "none", "--ceiling", "--json", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    c = r["ceiling"]
    assert c["shape"]["tokens"] == r["tokens_per_chunk"] == 16 and c["shape"]["kv_tokens"] == 48
    assert c["shape"]["forwards"] == 3 and c["fps"] > 0
    assert r["fraction_of_ceiling"] == pytest.approx(r["denoise_fps_steady"] / c["fps"])
    assert r["fraction_of_sustained_ceiling"] == pytest.approx(r["denoise_fps_steady"] / c["sustained_fps"])
    assert "ceiling, same chunk" in capsys.readouterr().out


@pytest.mark.gpu
def test_fp8_and_bf16_ceilings_run_on_the_gpu() -> None:
    """Needs torch._scaled_mm (compute capability >= 8.9), as the H200 runs of `bench --ceiling --quant fp8`."""
    s = CeilingShape.for_chunk(WanConfig.preset("synth"), tokens_per_frame=64, chunk_frames=8, window_frames=32, steps=4)
    for quant in ("none", "fp8"):
        r = measure_ceiling(s, torch.device("cuda"), torch.bfloat16, quant=quant)
        assert r["fps"] > 0 and r["self_attention_backend"] in ("cudnn", "flash", "efficient")
        assert r["chunk_seconds"] == pytest.approx(r["layer_seconds"] * 6 * 5)
        assert r["sustained_chunk_seconds"] > 0
