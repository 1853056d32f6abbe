"""`longlive bench`: reproducible generation speed of any model preset with random weights.

Speed does not depend on weight values, so the 5B architecture is timed without a download. A run:
1. builds the DiT (random weights, seeded, identical on every rank of an SP group) and, on the
   writer rank, a random VAE of the chosen architecture;
2. warm-up: one generation of `warmup_chunks` chunks (enough to fill the KV window, so every
   attention length torch.compile specialises on is compiled) with decode, timed and reported apart;
3. the timed generation of `chunks` chunks from random prompt embeddings (the text encoder is not
   part of the loop), streamed through the decode mode into a real MP4 file.
Reported (JSON and a table): denoising-loop FPS at steady state (chunks whose window is full:
pixel frames per chunk / (denoising steps + refresh)), end-to-end FPS (all pixel frames / wall time
from the first chunk to the closed MP4), per-chunk seconds of DiT, refresh, VAE and I/O, the
seconds of closing the MP4 after the last chunk (queued encodes, faststart remux), peak GPU memory,
and the hardware, software versions and commit. DiT and refresh are CUDA-event timed on the
diffusion stream; VAE (decode, uint8 conversion and copy to the host, overlapped piece by piece) and
I/O (handing the frames to the writer) are the decoder's own durations, H.264 encoding the writer
thread's; in the asynchronous modes they overlap the DiT.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.wan import WanConfig, WanModel
from .chunked import ChunkedOptions, PhaseTimer, generate_latents

log = logging.getLogger(__name__)

DECODE_MODES = ("none", "batch", "sync", "stream", "device", "rows")


@dataclass
class BenchSpec:
    preset: str = "wan2.2-ti2v-5b"
    height: int = 704  # pixels
    width: int = 1280
    steps: int = 4
    chunks: int = 10  # timed chunks (after the warm-up generation)
    warmup_chunks: int | None = None  # None: the window's chunks + 1
    chunk_frames: int = 8
    window_frames: int = 32
    sink_frames: int = 8
    decode: str = "sync"
    vae: str = "wan2.2"  # VAE architecture (random weights): wan2.2 or tiny
    vae_device: str | None = None  # decode == "device"
    quant: str = "none"  # none | fp8
    kv: str = "bf16"  # bf16 | fp4
    kv_comm: bool = False  # with kv fp4 under SP: K/V cross the all-to-all as NVFP4
    compile: bool = False
    dtype: str = "bfloat16"
    seed: int = 0
    output_dir: str | None = None  # where the MP4 goes (default: a temporary folder, deleted)
    ceiling: bool = False  # also measure the ceiling of the same chunk (longlive.pipelines.ceiling) in this run

    def check(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ValueError(f"bench: --decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.quant not in ("none", "fp8"):
            raise ValueError(f"bench: --quant must be none or fp8, got {self.quant!r}")
        if self.kv not in ("bf16", "fp4"):
            raise ValueError(f"bench: --kv must be bf16 or fp4, got {self.kv!r}")
        if self.height % 32 or self.width % 32:
            raise ValueError(f"bench: --height/--width ({self.height}x{self.width}) must be multiples of 32 "
                             "(VAE stride 16 x patch 2)")
        if self.chunks < 1 or self.steps < 1:
            raise ValueError("bench: --chunks and --steps must be at least 1")
        if self.kv_comm and self.kv != "fp4":
            raise ValueError("bench: --kv-comm sends the FP4 KV cache's K/V in FP4; it needs --kv fp4")
        if self.decode == "device" and not self.vae_device:
            raise ValueError("bench: --decode device needs --vae-device (e.g. cuda:1)")


def software_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "platform": platform.platform(), "cpu_count": os.cpu_count(), "commit": commit()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count_visible"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def commit() -> str | None:
    """LONGLIVE_COMMIT if set (machines without .git), else the checkout's `git rev-parse --short HEAD`."""
    if os.environ.get("LONGLIVE_COMMIT"):
        return os.environ["LONGLIVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def build_random_dit(preset: str, device: torch.device, dtype: torch.dtype, seed: int, quant: str = "none") -> WanModel:
    """The preset's DiT with seeded random weights made directly on `device` (no 20 GB host copy)."""
    with torch.device("meta"):
        model = WanModel(WanConfig.preset(preset))
    model.to_empty(device=device)
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    model = model.to(dtype).eval().requires_grad_(False)
    if quant == "fp8":
        from ..quant.fp8 import convert_to_fp8

        convert_to_fp8(model)
    return model


def build_random_vae(name: str, device: torch.device, dtype: torch.dtype, seed: int):
    from ..models.vae import WanVAE, WanVAEConfig

    torch.manual_seed(seed + 1)
    vae = WanVAE(WanVAEConfig.preset(name)).to(device=device, dtype=dtype).eval()
    return vae.to_channels_last().fuse_decoder_norms() if device.type == "cuda" else vae  # as InferencePipeline does


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


@dataclass
class _Run:
    wall: float
    phases: dict[str, list[float]] = field(default_factory=dict)
    decode: list[tuple[float, float]] = field(default_factory=list)  # per chunk (vae, io)
    encode: list[float] = field(default_factory=list)  # per chunk, in the writer thread
    close: float = 0.0  # the writer's close after the last chunk: queued encodes + faststart remux
    remux: float = 0.0  # of which the remux
    frames_written: int = 0


def run_bench(spec: BenchSpec, device: torch.device, sp=None, is_writer: bool = True) -> dict[str, Any]:
    """Build, warm up and time (see the module docstring); returns the report (on every rank)."""
    spec.check()
    dtype = getattr(torch, spec.dtype)
    cfg = WanConfig.preset(spec.preset)
    _, ph, pw = cfg.patch_size
    lat_h, lat_w = spec.height // 16, spec.width // 16
    if lat_h % ph or lat_w % pw:
        raise ValueError(f"bench: latent size {lat_h}x{lat_w} does not fit the patch size {cfg.patch_size}")
    options = ChunkedOptions(sampling_steps=spec.steps, chunk_frames=spec.chunk_frames, local_attn_size=spec.window_frames,
                             sink_size=spec.sink_frames, multi_shot_sink=spec.sink_frames > 0, multi_shot_rope_offset=8.0,
                             kv_quant=spec.kv == "fp4", kv_quant_comm=spec.kv_comm)
    if spec.ceiling:  # before the generation, not after it
        from .ceiling import check_quant

        check_quant(spec.quant, device)
    slots = spec.window_frames // spec.chunk_frames
    warmup = spec.warmup_chunks if spec.warmup_chunks is not None else slots + 1

    t_build = time.perf_counter()
    model = build_random_dit(spec.preset, device, dtype, spec.seed, spec.quant)
    if spec.compile:
        model.compile_blocks()
    vae = row_split = None
    if spec.decode == "rows":  # every rank of the group decodes a band of rows
        if not torch.distributed.is_initialized() or sp is None or sp.size < 2:
            raise ValueError("bench: --decode rows decodes on all ranks of a sequence-parallel group of 2 or more: "
                             "run it under torchrun with --sp-size >= 2")
        from ..parallel.vae_decode import RowSplit

        row_split = RowSplit(sp.group)
        vae = build_random_vae(spec.vae, device, dtype if device.type == "cuda" else torch.float32, spec.seed)
    elif is_writer and spec.decode != "none":
        vae_device = torch.device(spec.vae_device) if spec.decode == "device" else device
        vae = build_random_vae(spec.vae, vae_device, dtype if vae_device.type == "cuda" else torch.float32, spec.seed)
    build_seconds = time.perf_counter() - t_build

    def generate(num_chunks: int, out_dir: Path, name: str) -> _Run:
        from .decode import decode_batch, make_chunk_decoder, open_video_writer

        f = num_chunks * spec.chunk_frames
        g = torch.Generator().manual_seed(spec.seed)
        noise = torch.randn(1, cfg.in_dim, f, lat_h, lat_w, generator=g).to(device, dtype)
        prompts = (torch.randn(1, num_chunks, cfg.text_len, cfg.text_dim, generator=g) * 0.1).to(device, dtype)
        cuts = [[k > 0 and k % 4 == 0 for k in range(num_chunks)]]  # a scene cut every 4 chunks: pins + offsets
        timer = PhaseTimer(device=device)
        writer = decoder = None
        if vae is not None:
            writer = open_video_writer(out_dir / f"{name}.mp4", fps=24) if is_writer else None
            if spec.decode != "batch":
                decoder = make_chunk_decoder(vae, writer, spec.decode, row_split=row_split)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run = _Run(0.0)
        try:
            latents = generate_latents(model, noise, prompts, options=options, scene_cuts=cuts, sequence_parallel=sp,
                                       timer=timer, on_chunk=None if decoder is None else decoder.submit)
            if decoder is not None:
                decoder.finish()
                stats = decoder.stats
            elif vae is not None:
                stats = decode_batch(vae, latents, writer)
            else:
                stats = None
            if writer is not None:
                w, writer = writer, None
                t_close = time.perf_counter()
                w.close()  # waits for the encoder thread
                run.close = time.perf_counter() - t_close
                run.remux = getattr(w.sink, "remux_seconds", 0.0)
                run.encode = list(w.encode_seconds)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            run.wall = time.perf_counter() - t0
        finally:
            if decoder is not None:
                decoder.close()
            if writer is not None:
                writer.close()
        run.phases = timer.seconds
        if stats is not None:
            run.decode = [(c.decode_seconds, c.io_seconds) for c in stats.chunks]
            run.frames_written = stats.frames
        return run

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(spec.output_dir) if spec.output_dir else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        generate(warmup, out_dir, "warmup")
        warmup_seconds = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run = generate(spec.chunks, out_dir, "bench")
        video_bytes = (out_dir / "bench.mp4").stat().st_size if (out_dir / "bench.mp4").exists() else None

    frames_per_chunk = 4 * spec.chunk_frames
    pixel_frames = 1 + 4 * (spec.chunks * spec.chunk_frames - 1)
    steady = list(range(min(slots - 1, spec.chunks - 1), spec.chunks))  # chunks that attend over a full window
    dit = [run.phases["dit"][k] for k in steady]
    refresh = [run.phases["refresh"][k] for k in steady]
    chunk_seconds = [a + b for a, b in zip(dit, refresh)]
    vae_s = [run.decode[k][0] for k in steady if k < len(run.decode)] if spec.decode not in ("none", "batch") else []
    io_s = [run.decode[k][1] for k in steady if k < len(run.decode)] if spec.decode not in ("none", "batch") else []
    enc_s = [run.encode[k] for k in steady if k < len(run.encode)] if spec.decode not in ("none", "batch") else []
    report: dict[str, Any] = {
        "spec": asdict(spec),
        "sp_size": 1 if sp is None else sp.size,
        "tokens_per_chunk": spec.chunk_frames * (lat_h // ph) * (lat_w // pw),
        "denoise_fps_steady": frames_per_chunk / statistics.fmean(chunk_seconds),
        "end_to_end_fps": pixel_frames / run.wall if spec.decode != "none" else None,
        "loop_fps_all_chunks": pixel_frames / sum(a + b for a, b in zip(run.phases["dit"], run.phases["refresh"])),
        "steady_chunks": steady,
        "seconds_per_chunk": {"dit": statistics.fmean(dit), "refresh": statistics.fmean(refresh),
                              "vae": _mean(vae_s), "io": _mean(io_s), "encode": _mean(enc_s),
                              "dit_min": min(dit), "dit_max": max(dit)},
        "decode_total_seconds": sum(v for v, _ in run.decode) if run.decode else None,
        "io_total_seconds": sum(i for _, i in run.decode) if run.decode else None,
        "encode_total_seconds": sum(run.encode) if run.encode else None,
        "close_seconds": run.close if run.encode else None,
        "remux_seconds": run.remux if run.encode else None,
        "wall_seconds": run.wall,
        "pixel_frames": pixel_frames,
        "frames_written": run.frames_written if spec.decode != "none" else None,
        "video_bytes": video_bytes,
        "warmup": {"chunks": warmup, "seconds": warmup_seconds, "build_seconds": build_seconds, "compiled": spec.compile},
        "software": software_info(device),
    }
    if device.type == "cuda":  # the generation's peak, before the ceiling's own tensors
        report["peak_memory_gib"] = {"allocated": torch.cuda.max_memory_allocated(device) / 2**30,
                                     "reserved": torch.cuda.max_memory_reserved(device) / 2**30}
        if vae is not None and spec.decode == "device":
            vd = torch.device(spec.vae_device)
            if vd.type == "cuda":
                report["peak_memory_gib"]["vae_device_allocated"] = torch.cuda.max_memory_allocated(vd) / 2**30
    if spec.ceiling:  # same process, device and shapes as the timed run
        from .ceiling import CeilingShape, measure_ceiling

        shape = CeilingShape.for_chunk(cfg, tokens_per_frame=(lat_h // ph) * (lat_w // pw), chunk_frames=spec.chunk_frames,
                                       window_frames=spec.window_frames, steps=spec.steps,
                                       sp_size=1 if sp is None else sp.size)
        report["ceiling"] = measure_ceiling(shape, device, dtype, spec.quant, pixel_frames_per_chunk=frames_per_chunk)
        report["fraction_of_ceiling"] = report["denoise_fps_steady"] / report["ceiling"]["fps"]
        report["fraction_of_sustained_ceiling"] = report["denoise_fps_steady"] / report["ceiling"]["sustained_fps"]
    return report


def format_table(report: dict[str, Any]) -> str:
    s, sec = report["spec"], report["seconds_per_chunk"]
    ms = lambda v: "-" if v is None else f"{v * 1000:.1f} ms"
    sw = report["software"]
    rows = [
        ("model", f"{s['preset']} {s['height']}x{s['width']}, {s['steps']} steps, chunk {s['chunk_frames']} latent frames "
                  f"({report['tokens_per_chunk']} tokens), window {s['window_frames']}, sink {s['sink_frames']}"),
        ("setup", f"sp {report['sp_size']}, dtype {s['dtype']}, quant {s['quant']}, kv {s['kv']}"
                  f"{' (FP4 all-to-all)' if s['kv_comm'] else ''}, compile {s['compile']}, "
                  f"decode {s['decode']} ({s['vae']} VAE)"),
        ("denoising loop, steady", f"{report['denoise_fps_steady']:.2f} FPS (chunks {report['steady_chunks'][0]}.."
                                   f"{report['steady_chunks'][-1]}, window full)"),
        ("denoising loop, all chunks", f"{report['loop_fps_all_chunks']:.2f} FPS"),
        ("end to end (decode + MP4)", "-" if report["end_to_end_fps"] is None else
         f"{report['end_to_end_fps']:.2f} FPS ({report['pixel_frames']} frames in {report['wall_seconds']:.2f} s"
         + ("" if report.get("close_seconds") is None else
            f"; closing the MP4 after the last chunk {report['close_seconds']:.2f} s, remux {report['remux_seconds']:.2f} s")
         + ")"),
        ("per chunk", f"DiT {ms(sec['dit'])}, refresh {ms(sec['refresh'])}, VAE {ms(sec['vae'])}, "
                      f"I/O {ms(sec['io'])} (hand-over to the writer), H.264 {ms(sec['encode'])} (writer thread)"),
        *([("ceiling, same chunk", _ceiling_row(report))] if "ceiling" in report else []),
        ("warm-up (excluded)", f"{report['warmup']['chunks']} chunks in {report['warmup']['seconds']:.1f} s; "
                               f"build {report['warmup']['build_seconds']:.1f} s"),
    ]
    if "peak_memory_gib" in report:
        m = report["peak_memory_gib"]
        rows.append(("peak GPU memory", f"{m['allocated']:.2f} GiB allocated, {m['reserved']:.2f} GiB reserved"))
    rows.append(("hardware / software", f"{sw.get('gpu', platform.processor() or 'cpu')} x{report['sp_size']}, torch "
                                        f"{sw['torch']}, cuda {sw['cuda']}, triton {sw['triton']}, commit {sw['commit']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _ceiling_row(report: dict[str, Any]) -> str:
    c = report["ceiling"]
    return (f"{c['fps']:.2f} FPS from the products and attention alone ({c['linear_tflops']:.0f} TFLOP/s linear, "
            f"{c['self_attention_backend']} attention {c['self_attention_tflops']:.0f} TFLOP/s), {c['sustained_fps']:.2f} "
            f"FPS sustained (the chunk's calls back to back); the loop reaches {100 * report['fraction_of_ceiling']:.1f}% "
            f"/ {100 * report['fraction_of_sustained_ceiling']:.1f}% of them")


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
