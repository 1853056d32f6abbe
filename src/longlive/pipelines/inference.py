"""Long-video inference from a config: prompts -> text embeddings -> chunked DiT -> decode -> MP4.

`InferencePipeline.from_config(cfg)` builds the components once (DiT with optional LoRA, text
encoder, VAE); `generate(sample, seed, out_stem)` writes one video (and its prompts sidecar)
with frames appended to the MP4 as each chunk is decoded when `inference.streaming_vae` is on.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import Config, ConfigError
from ..config.paths import check_generator_checkpoint, require_path, resolve_generator_weights
from ..data.prompts import PromptSample
from ..io.checkpoint import write_torch
from ..models.wan import WanConfig, WanModel
from ..models.wan.lora import apply_lora, load_lora_state_dict, merge_lora, read_lora_checkpoint
from ..models.wan.state_dict import is_nvfp4_state_dict, load_state_dict, load_weights
from .chunked import ChunkedOptions, generate_latents

if TYPE_CHECKING:
    from ..parallel.inference import InferenceParallel

log = logging.getLogger(__name__)


def chunked_options(cfg: Config) -> ChunkedOptions:
    """Sampling/cache options of a config (inference section first, model_kwargs as fallback)."""
    inf = cfg.inference
    return ChunkedOptions(
        sampling_steps=inf.sampling_steps, guidance_scale=inf.guidance_scale, chunk_frames=cfg.frames_per_chunk,
        local_attn_size=cfg.local_attn_size, sink_size=cfg.sink_size, multi_shot_sink=inf.multi_shot_sink,
        multi_shot_rope_offset=inf.multi_shot_rope_offset, shot_clean_recache=inf.shot_clean_recache,
        t_scale=inf.inference_t_scale, timestep_shift=cfg.model_kwargs.timestep_shift,
        kv_quant=inf.kv_quant, kv_quant_scale_rule=inf.kv_quant_scale_rule, kv_quant_key_smoothing=inf.kv_quant_key_smoothing,
        kv_quant_backend=inf.kv_quant_backend, kv_quant_comm=inf.kv_quant_comm,
    )


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def nvfp4_backend(cfg: Config) -> str:
    """Our NVFP4 backend for a config (`model_quant_backend` also accepts the reference's kernel names)."""
    if cfg.model_quant_use_transformer_engine:
        return "transformer_engine"
    name = cfg.model_quant_backend
    return "emulated" if name in (None, "cuda", "triton", "pytorch") else name


def _check_compact_rule(cfg: Config, path: Path, meta: dict[str, Any]) -> None:
    """The scale rule fixes the dequantization denominators and is not in the buffers: a checkpoint that
    records it must agree with the config, or every weight would be silently mis-scaled."""
    import json

    from ..quant.convert import inference_recipe
    from ..quant.nvfp4 import rule_maxima

    q = meta.get("quantization")
    if isinstance(q, str):
        q = json.loads(q)
    saved = q.get("weight_scale_rule") if isinstance(q, dict) else None
    wanted = inference_recipe(cfg).weight_rule
    if saved is not None and rule_maxima(saved) != rule_maxima(wanted):
        raise ConfigError(f"{cfg.source}: {path} was quantized with weight scale rule {saved!r}, but the config resolves "
                          f"model_quant_weight_scale_rule to {wanted!r} (different dequantization scales). "
                          f"Set model_quant_weight_scale_rule: {saved}")


def build_generator(cfg: Config, device: torch.device, dtype: torch.dtype) -> WanModel:
    """The DiT of a config: weights from `checkpoints.generator_ckpt` (or explicit random weights),
    then the LoRA of `checkpoints.lora_ckpt` (adapter section), merged when `merge_lora` is set (always
    before NVFP4 quantization), then `model_quant` (NVFP4) or `fp8_quant` conversion on `device`."""
    from ..quant.convert import inference_filter, inference_recipe, prepare_compact_model, quantize_model

    wan_cfg = WanConfig.preset(cfg.model_preset)
    weights = resolve_generator_weights(cfg)
    compact = False
    if weights is None:
        torch.manual_seed(cfg.logging.seed)
        model = WanModel(wan_cfg)
        log.warning("generator: RANDOM weights (checkpoints.random_weights: true)")
    else:
        if weights.is_file():
            check_generator_checkpoint(cfg, weights)  # e.g. a merged export together with lora_ckpt
        sd, meta = load_state_dict(weights, use_ema=cfg.inference.use_ema, allow_nvfp4=True)
        compact = is_nvfp4_state_dict(sd)
        with torch.device("meta"):
            model = WanModel(wan_cfg)
        if compact:
            if not cfg.model_quant:
                raise ConfigError(f"{cfg.source}: checkpoints.generator_ckpt {weights} is a compact NVFP4 checkpoint; "
                                  "set model_quant: true to load it")
            if cfg.checkpoints.lora_ckpt:
                raise ConfigError(f"{cfg.source}: a compact NVFP4 checkpoint ({weights}) cannot take a LoRA "
                                  "(checkpoints.lora_ckpt); export it with the LoRA: `longlive export nvfp4 --lora-ckpt ...`")
            _check_compact_rule(cfg, weights, meta)
            prepare_compact_model(model, inference_recipe(cfg), inference_filter(cfg), nvfp4_backend(cfg))
        load_weights(model, sd, allow_nvfp4=compact)
        log.info("generator: %s (%s)", weights, meta.get("checkpoint_format", "weights"))
    if cfg.checkpoints.lora_ckpt:
        if cfg.adapter is None:
            raise ValueError(f"{cfg.source}: checkpoints.lora_ckpt is set but there is no `adapter` section (rank, alpha)")
        lora_path = require_path(cfg, "checkpoints.lora_ckpt", kind="file")
        apply_lora(model, cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.dropout)
        state, _ = read_lora_checkpoint(lora_path)
        load_lora_state_dict(model, state, source=str(lora_path))
        if cfg.merge_lora or cfg.model_quant or cfg.fp8_quant:
            merge_lora(model)
            log.info("LoRA %s merged into the generator%s", lora_path,
                     "" if cfg.merge_lora else " (quantization needs merged weights)")
        else:
            log.info("LoRA %s applied at run time", lora_path)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if cfg.model_quant and not compact:
        quantize_model(model, inference_recipe(cfg), inference_filter(cfg), backend=nvfp4_backend(cfg), materialize=True)
    if cfg.fp8_quant:
        from ..quant.fp8 import convert_to_fp8

        convert_to_fp8(model)
    return model


def build_text_encoder(cfg: Config, wan_cfg: WanConfig, device: torch.device, dtype: torch.dtype):
    """`model_kwargs.text_encoder`: UMT5-XXL from the Wan folder, or the weight-free hash encoder
    (`auto`: hash for the tiny and synth presets)."""
    kind = cfg.model_kwargs.text_encoder
    if kind == "hash" or (kind == "auto" and cfg.model_preset in ("tiny", "synth")):
        from ..models.text.small import HashTextEncoder

        return HashTextEncoder(wan_cfg.text_dim, wan_cfg.text_len, seed=0, device=device, dtype=dtype)
    from ..io.model_folder import resolve_wan_model_folder
    from ..models.text import TextEncoder

    paths = resolve_wan_model_folder(require_path(cfg, "checkpoints.wan_model_dir", kind="dir"), components=("text_encoder", "tokenizer"))
    return TextEncoder.from_pretrained(paths.text_encoder, paths.tokenizer, dtype=dtype, device=device, offload_after_encode=True)


def build_vae(cfg: Config, device: torch.device, dtype: torch.dtype):
    """The VAE of `inference.vae_type`: Wan2.2 / LightVAE from their files, the tiny random one, or the
    weight-free patchify VAE."""
    from ..models.vae import WanVAE, WanVAEConfig, load_vae

    vae_type = cfg.inference.vae_type
    if vae_type == "patchify":
        from ..models.vae.patchify import PatchifyVAE

        return PatchifyVAE().to(device=device, dtype=dtype).eval()
    if vae_type == "tiny":
        torch.manual_seed(cfg.logging.seed + 1)
        return WanVAE(WanVAEConfig.preset("tiny")).to(device=device, dtype=dtype).eval()
    if vae_type == "wan":
        from ..io.model_folder import resolve_wan_model_folder

        path = resolve_wan_model_folder(require_path(cfg, "checkpoints.wan_model_dir", kind="dir"), components=("vae",)).vae
    else:
        name = "MG-LightVAE.pth" if vae_type == "mg_lightvae" else "MG-LightVAE_v2.pth"
        path = require_path(cfg, "checkpoints.lightvae_dir", kind="dir") / name
    return load_vae(path, vae_type=vae_type, dtype=dtype, device=device).eval()


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """An RGB image as `[1, 3, 1, height, width]` in [-1, 1] (plain resize, as the reference does)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((width, height), Image.BICUBIC)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the I2V conditioning image: {exc}") from exc
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (x.permute(2, 0, 1).float() / 127.5 - 1.0)[None, :, None]


def _compile_mode(cfg: Config, device: torch.device):
    """False (eager) or the torch.compile mode: `torch_compile: true` uses `torch_compile_mode`;
    `auto` compiles with the default mode on CUDA only (fast to compile, about +30% FPS on an H200)."""
    if cfg.torch_compile is True:
        return cfg.torch_compile_mode
    if cfg.torch_compile == "auto" and device.type == "cuda":
        return None
    return False


def prompt_runs(prompts: list[str]) -> list[tuple[list[int], str]]:
    """Runs of identical consecutive chunk prompts: [([0, 1, 2], "a ..."), ([3], "b ...")]."""
    runs: list[tuple[list[int], str]] = []
    for i, p in enumerate(prompts):
        if runs and runs[-1][1] == p:
            runs[-1][0].append(i)
        else:
            runs.append(([i], p))
    return runs


def output_stem(index: int, sample: PromptSample, seed: int) -> str:
    """Stable, readable file stem: `0003-robot_lab_demo-seed42`."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", sample.name).strip("_")[:60] or "sample"
    return f"{index:04d}-{slug}-seed{seed}"


@dataclass
class GenerationResult:
    path: Path
    latent_frames: int
    pixel_frames: int
    seconds: float
    dit_seconds: float


def _decodes_by_rows(cfg: Config, sp_size: int, quiet: bool = False) -> bool:
    """Whether every rank of an SP group of `sp_size` decodes a band of rows ("rows" decode mode).

    It replaces the "sync" and "stream" modes under sequence parallelism (`inference.sp_vae_decode:
    rows`, the default); a dedicated `vae_device`, whole-video decoding and latents-only runs keep their
    modes, and a VAE without banded decoding or a latent height that does not split into `sp_size`
    equal bands falls back to decoding on the writer rank, with a log line saying why (unless `quiet`:
    the pipeline asks twice, once to decide whether the rank needs a VAE and once when it is built).
    """
    inf = cfg.inference
    if sp_size < 2 or inf.sp_vae_decode != "rows" or inf.save_latents_only:
        return False
    from .decode import decode_mode

    if decode_mode(inf.streaming_vae, inf.async_vae, inf.vae_device) not in ("sync", "stream"):
        return False
    shape = cfg.data.image_or_video_shape
    height = shape[3] if shape and len(shape) == 5 else None
    if inf.vae_type == "patchify":  # the Wan2.2 VAE classes decode by bands (WanVAE.split_rows)
        if not quiet:
            log.info("inference.sp_vae_decode: rows is not available for vae_type patchify; the writer rank decodes")
        return False
    if height is None or height % sp_size:
        if not quiet:
            log.info("inference.sp_vae_decode: %s latent rows do not split into %d equal bands; the writer rank "
                     "decodes", height, sp_size)
        return False
    return True


class InferencePipeline:
    """The components of one run and the per-sample generation."""

    def __init__(self, cfg: Config, generator: WanModel, text_encoder: Any, vae: Any, device: torch.device, dtype: torch.dtype,
                 parallel: "InferenceParallel | None" = None):
        self.cfg, self.generator, self.text_encoder, self.vae = cfg, generator, text_encoder, vae
        self.device, self.dtype = device, dtype
        self.options = chunked_options(cfg)
        self.sp = None if parallel is None else parallel.sp
        self.is_writer = parallel is None or parallel.is_writer  # decodes and writes (the first rank of an SP group)
        self.row_split = None  # set when every rank of the SP group decodes a band of rows ("rows" decode)
        if vae is not None and self.sp is not None and _decodes_by_rows(cfg, self.sp.size):
            from ..parallel.vae_decode import RowSplit

            self.row_split = RowSplit(self.sp.group)
            log.info("VAE decode: each of the %d ranks of the SP group decodes a band of rows of every chunk "
                     "(inference.sp_vae_decode: rows)", self.sp.size)

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | None = None, dtype: torch.dtype | None = None,
                    parallel: "InferenceParallel | None" = None) -> "InferencePipeline":
        """Build the components; under sequence parallelism only the group's writer rank builds a VAE."""
        device = device or default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        generator = build_generator(cfg, device, dtype)
        compile_mode = _compile_mode(cfg, device)
        if compile_mode is not False:
            generator.compile_blocks(compile_mode)
            log.info("generator blocks compiled (torch.compile mode=%s); the first chunks include compilation", compile_mode)
        text = build_text_encoder(cfg, generator.config, device, dtype)
        writer = parallel is None or parallel.is_writer
        rows = parallel is not None and parallel.sp is not None and _decodes_by_rows(cfg, parallel.sp.size, quiet=True)
        needs_vae = cfg.i2v or ((writer or rows) and not cfg.inference.save_latents_only)
        vae_device = device
        if cfg.inference.streaming_vae and cfg.inference.vae_device and not cfg.i2v:
            vae_device = torch.device(cfg.inference.vae_device)  # the "device" decode mode (background thread)
        vae = build_vae(cfg, vae_device, dtype if vae_device.type == "cuda" else torch.float32) if needs_vae else None
        if vae is not None and vae_device.type == "cuda" and hasattr(vae, "to_channels_last"):
            vae.to_channels_last().fuse_decoder_norms()  # cuDNN's fast layout, fused norms (docs/vae.md)
        return cls(cfg, generator, text, vae, device, dtype, parallel)

    def latent_shape(self) -> tuple[int, int, int, int]:
        shape = self.cfg.data.image_or_video_shape
        if not shape or len(shape) != 5:
            raise ValueError(f"{self.cfg.source}: data.image_or_video_shape must be [B, F, C, H, W], got {shape}")
        _, _, c, h, w = shape
        if c != self.generator.config.in_dim:
            raise ValueError(f"{self.cfg.source}: data.image_or_video_shape has {c} channels, the model takes {self.generator.config.in_dim}")
        return c, self.cfg.latent_frames, h, w

    @torch.no_grad()
    def generate(self, sample: PromptSample, seed: int, out_dir: Path, stem: str, progress: bool = True) -> GenerationResult:
        """Generate one video for `sample` and write `<stem>.mp4` (or `.pt` latents) plus `<stem>.prompts.txt`.

        Decoding follows `inference.streaming_vae` / `async_vae` / `vae_device` (`longlive.pipelines.decode`):
        streamed modes hand each chunk's frames to the MP4 writer as they are ready. Under sequence
        parallelism every rank of the group runs this; only the writer rank decodes and writes files.
        """
        from tqdm import tqdm

        from .decode import decode_batch, decode_mode, make_chunk_decoder, open_video_writer

        c, f, h, w = self.latent_shape()
        n = self.options.chunk_frames
        if sample.num_chunks != f // n:
            raise ValueError(f"{sample.source}: {sample.num_chunks} chunk prompts for {f // n} chunks")
        g = torch.Generator(device="cpu").manual_seed(seed)  # the same noise on every rank of a group
        noise = torch.randn(1, c, f, h, w, generator=g).to(self.device, self.dtype)
        prompts = self.text_encoder.encode_chunks([sample.prompts]).to(self.device, self.dtype)
        image_latent = None
        if self.cfg.i2v:
            image_path = getattr(sample, "image_path", None)
            if image_path is None or self.vae is None:
                raise ValueError(f"{sample.source}: i2v needs an image per prompt (images/<stem>.png + prompts/<stem>.txt) and a VAE")
            stride = 16
            image = load_image(Path(image_path), h * stride, w * stride).to(self.vae.device, self.vae.dtype)
            image_latent = self.vae.encode(image).to(self.device, self.dtype)
            if image_latent.shape[2] != 1:
                raise ValueError(f"{image_path}: the image encoded to {image_latent.shape[2]} latent frames, expected 1")
        neg = None
        if self.options.guidance_scale != 1.0:
            neg = self.text_encoder.encode([self.cfg.inference.negative_prompt]).to(self.device, self.dtype)
        if self.sp is not None:  # one video per group: every rank uses the first rank's inputs, bit for bit
            noise, prompts, neg, image_latent = (None if t is None else self.sp.broadcast_(t.contiguous())
                                                 for t in (noise, prompts, neg, image_latent))
        inf = self.cfg.inference
        save_latents = inf.save_latents_only
        path = out_dir / (f"{stem}.pt" if save_latents else f"{stem}.mp4")
        t0 = time.perf_counter()
        if not self.is_writer:  # another rank of an SP group: its share of every chunk (and of its rows), no files
            decoder = None
            if self.row_split is not None:
                decoder = make_chunk_decoder(self.vae, None, "rows", row_split=self.row_split)
            try:
                generate_latents(self.generator, noise, prompts, options=self.options, scene_cuts=[sample.scene_cuts],
                                 negative_embeds=neg, image_latent=image_latent, sequence_parallel=self.sp,
                                 on_chunk=None if decoder is None else decoder.submit)
                if decoder is not None:
                    decoder.finish()
            finally:
                if decoder is not None:
                    decoder.close()
            seconds = time.perf_counter() - t0
            return GenerationResult(path, f, 1 + 4 * (f - 1), seconds, seconds)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.prompts.txt").write_text(
            "".join(f"{idx} {p}\n" for idx, p in prompt_runs(sample.prompts)))
        mode = "latents" if save_latents else decode_mode(inf.streaming_vae, inf.async_vae, inf.vae_device)
        if self.row_split is not None:
            mode = "rows"
        writer = decoder = None
        if not save_latents:
            writer = open_video_writer(path, fps=24)
            if mode != "batch":
                decoder = make_chunk_decoder(self.vae, writer, mode, row_split=self.row_split)
        bar = tqdm(total=f // n, desc=stem, unit="chunk", disable=not progress)
        frames_out = 0

        def on_chunk(k: int, x: torch.Tensor) -> None:
            nonlocal frames_out
            if decoder is not None:
                decoder.submit(k, x)
            frames_out += 4 * n - (3 if k == 0 else 0)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(frames=frames_out, fps=f"{frames_out / max(elapsed, 1e-9):.2f}")
            bar.update(1)

        try:
            latents = generate_latents(self.generator, noise, prompts, options=self.options,
                                       scene_cuts=[sample.scene_cuts], negative_embeds=neg, image_latent=image_latent,
                                       on_chunk=on_chunk, sequence_parallel=self.sp)
            dit_seconds = time.perf_counter() - t0
            if save_latents:
                write_torch({"latents": latents.permute(0, 2, 1, 3, 4).contiguous().cpu(), "prompts": list(sample.prompts),
                             "seed": seed}, path)
            elif decoder is not None:
                decoder.finish()
                log.info("%s decode: %s", mode, decoder.stats.summary())
            else:
                decode_batch(self.vae, latents, writer)
        finally:
            bar.close()
            if decoder is not None:
                decoder.close()
            if writer is not None:
                writer.close()
        return GenerationResult(path, f, 1 + 4 * (f - 1), time.perf_counter() - t0, dit_seconds)
