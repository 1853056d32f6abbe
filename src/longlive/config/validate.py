"""Cross-field checks of a typed `Config` (chunk divisibility, sink/window fit, SP sizes, LoRA/merge, quantization).

Each problem names the file and the field(s) and says what to do; all problems are reported together.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from longlive.config.errors import ConfigError
from longlive.config.paths import check_generator_checkpoint, is_placeholder
from longlive.config.schema import Config

logger = logging.getLogger(__name__)


class _Checker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.issues: list[str] = []

    def ref(self, dotted: str) -> str:
        origin = self.cfg.origins.get(dotted)
        if origin and origin != dotted:
            return f"'{dotted}' (from {origin if origin.startswith('override') else repr(origin)})"
        return f"'{dotted}'"

    def fail(self, dotted: str, text: str) -> None:
        self.issues.append(f"{self.cfg.source or '<config>'}: field {self.ref(dotted)}: {text}")


def _frames_field(cfg: Config) -> str:
    return "inference.num_output_frames" if cfg.inference.num_output_frames is not None else "data.image_or_video_shape"


def _sink_field(cfg: Config) -> str:
    return "inference.sink_size" if cfg.inference.sink_size is not None else "model_kwargs.sink_size"


def _window_field(cfg: Config) -> str:
    return "inference.local_attn_size" if cfg.inference.local_attn_size is not None else "model_kwargs.local_attn_size"


def _check_model(c: _Checker) -> Optional[object]:
    cfg = c.cfg
    try:
        from longlive.models.wan.config import WanConfig

        return WanConfig.preset(cfg.model_preset)
    except ImportError as exc:  # the model package is optional for pure config work
        logger.debug("model presets unavailable (%s); skipping model-shape checks", exc)
        return None


def _check_frames(c: _Checker) -> None:
    cfg = c.cfg
    chunk = cfg.frames_per_chunk
    shape = cfg.data.image_or_video_shape
    if len(shape) != 5 or any(s < 1 for s in shape):
        c.fail("data.image_or_video_shape", f"expected 5 positive integers [B, F, C, H, W], got {shape}.")
        return
    frames = cfg.latent_frames
    if frames % chunk:
        lo, hi = (frames // chunk) * chunk, (frames // chunk + 1) * chunk
        c.fail(_frames_field(cfg),
               f"{frames} latent frames is not a multiple of the chunk size model_kwargs.num_frame_per_block={chunk}. "
               f"Use {lo or hi} or {hi}.")
    preset = _check_model(c)
    if preset is not None:
        in_dim = getattr(preset, "in_dim", None)
        patch = getattr(preset, "patch_size", (1, 1, 1))
        if in_dim is not None and shape[2] != in_dim:
            c.fail("data.image_or_video_shape",
                   f"latent channels C={shape[2]} do not match model '{cfg.model_kwargs.model_name}' ({in_dim} channels).")
        from longlive.models.vae.patchify import PatchifyVAEConfig

        vae_z = PatchifyVAEConfig().z_dim if cfg.inference.vae_type == "patchify" else 48  # Wan2.2 family: 48
        if in_dim is not None and in_dim != vae_z:
            c.fail("inference.vae_type",
                   f"the {cfg.inference.vae_type} VAE has {vae_z} latent channels but model "
                   f"'{cfg.model_kwargs.model_name}' takes {in_dim}; use "
                   f"{'vae_type: patchify' if in_dim == PatchifyVAEConfig().z_dim else 'a Wan2.2-family VAE (wan, mg_lightvae*, tiny)'}.")
        if shape[3] % patch[1] or shape[4] % patch[2]:
            c.fail("data.image_or_video_shape",
                   f"latent H={shape[3]}, W={shape[4]} must be multiples of the patch size {tuple(patch[1:])}.")
    trains = any(k.startswith(("training.", "algorithm.")) for k in cfg.origins)
    if trains or "evaluation.num_frames" in cfg.origins:
        for i, n in enumerate(cfg.evaluation.num_frames):
            if n % chunk:
                c.fail("evaluation.num_frames", f"entry {i} = {n} is not a multiple of the chunk size {chunk}.")
    if trains:
        t = cfg.training
        for name in ("min_num_training_frames", "num_training_frames", "slice_last_frames"):
            value = getattr(t, name)
            if value % chunk:
                c.fail(f"training.{name}", f"{value} is not a multiple of the chunk size {chunk}.")
        if t.min_num_training_frames > t.num_training_frames:
            c.fail("training.min_num_training_frames",
                   f"{t.min_num_training_frames} exceeds training.num_training_frames={t.num_training_frames}.")


def _check_cache(c: _Checker) -> None:
    """Chunk-granular KV cache: sink and window must be whole chunks and the window must hold sink + pin + new chunk."""
    cfg = c.cfg
    chunk = cfg.frames_per_chunk
    mk = cfg.model_kwargs
    if mk.sink_size % chunk:
        c.fail("model_kwargs.sink_size", f"{mk.sink_size} is not a multiple of the chunk size {chunk} "
               f"(the KV cache keeps whole chunks). Use 0, {chunk}, {2 * chunk}, ...")
    if mk.local_attn_size != -1 and (mk.local_attn_size <= 0 or mk.local_attn_size % chunk):
        c.fail("model_kwargs.local_attn_size", f"{mk.local_attn_size} must be -1 (global attention) or a positive "
               f"multiple of the chunk size {chunk}.")
    sink, window = cfg.sink_size, cfg.local_attn_size
    if cfg.inference.sink_size is not None and sink % chunk:
        c.fail("inference.sink_size", f"{sink} is not a multiple of the chunk size {chunk} "
               f"(the KV cache keeps whole chunks). Use 0, {chunk}, {2 * chunk}, ...")
    if cfg.inference.local_attn_size is not None and window != -1 and (window <= 0 or window % chunk):
        c.fail("inference.local_attn_size", f"{window} must be -1 (global attention) or a positive multiple of the "
               f"chunk size {chunk}.")
    if window == -1 or window <= 0 or window % chunk or sink % chunk:
        return
    pin = 1 if (cfg.inference.multi_shot_sink and sink > 0) else 0
    need = sink // chunk + pin + 1
    have = window // chunk
    if have < need:
        parts = [f"{sink // chunk} sink chunk(s) ({_sink_field(cfg)}={sink})"]
        if pin:
            parts.append("1 pinned shot chunk (inference.multi_shot_sink)")
        parts.append("1 new chunk")
        c.fail(_window_field(cfg),
               f"window of {window} frames = {have} chunk(s) cannot hold {' + '.join(parts)} = {need} chunks. "
               f"Set it to at least {need * chunk} (or -1 for global attention), or reduce the sink.")


def _check_parallel(c: _Checker) -> None:
    cfg = c.cfg
    chunk = cfg.frames_per_chunk
    try:
        heads = cfg.num_heads
    except Exception as exc:  # unknown preset is reported by the schema; stay quiet here
        logger.debug("cannot determine number of heads: %s", exc)
        heads = None
    for field, size in (("sp_size", cfg.sp_size), ("infra.sequence_parallel_size", cfg.infra.sequence_parallel_size)):
        if size == 1:
            continue
        if heads is not None and heads % size:
            c.fail(field, f"{size} does not divide the number of attention heads ({heads}, model_num_heads). "
                   f"Use a divisor of {heads}.")
        if field == "sp_size" and chunk % size:
            c.fail(field, f"{size} does not divide the frames per chunk ({chunk}); each SP rank needs whole frames.")
    sp = cfg.infra.sequence_parallel_size
    if sp > 1:
        frames = int(cfg.data.image_or_video_shape[1])
        if frames % (sp * chunk):
            c.fail("data.image_or_video_shape",
                   f"{frames} training latent frames must be a multiple of infra.sequence_parallel_size x chunk "
                   f"= {sp} x {chunk} = {sp * chunk} (each SP rank owns whole chunks).")
    if cfg.sp_size > 1:
        unsupported = [("i2v", cfg.i2v), ("inference.use_relative_rope", cfg.inference.use_relative_rope)]
        for field, on in unsupported:
            if on:
                c.fail(field, f"is not supported with sequence-parallel inference (sp_size={cfg.sp_size}). "
                       f"Disable it or set sp_size: 1.")


    inf = cfg.inference
    if inf.kv_quant_comm and not inf.kv_quant:
        c.fail("inference.kv_quant_comm", "sends K/V in NVFP4 and needs inference.kv_quant: true")
    if inf.kv_quant_comm and inf.kv_quant_backend == "triton":
        c.fail("inference.kv_quant_comm", "reads the current chunk from its FP4 slot, which kv_quant_backend: triton "
               "(fused kernel) does not; use kv_quant_backend: cuda or pytorch")


def _check_weights(c: _Checker) -> None:
    cfg = c.cfg
    ck = cfg.checkpoints
    if ck.random_weights and ck.generator_ckpt is not None:
        c.fail("checkpoints.random_weights", f"is true but checkpoints.generator_ckpt is also set ({ck.generator_ckpt!r}). "
               f"Remove one of them.")
    if ck.lora_ckpt is not None and cfg.adapter is None:
        c.fail("checkpoints.lora_ckpt", "is set but there is no 'adapter' section, so the LoRA would be ignored. "
               "Add the adapter section (type lora, rank, alpha) or remove lora_ckpt.")
    if cfg.fp8_quant and cfg.model_quant:
        c.fail("fp8_quant", "fp8_quant and model_quant (NVFP4) are mutually exclusive. Enable only one.")
    if cfg.i2v and not cfg.inference.independent_first_frame:
        c.fail("inference.independent_first_frame", "must be true when i2v is true (frame 0 is held at the image latent).")
    # Merged checkpoint + LoRA: only checkable when the file is really there (placeholders are fine until used).
    path = ck.generator_ckpt
    if path and not is_placeholder(path) and Path(path).expanduser().is_file():
        try:
            check_generator_checkpoint(cfg, Path(path).expanduser())
        except ConfigError as exc:
            c.issues.extend(exc.issues)


def _warn(cfg: Config) -> None:
    inf = cfg.inference
    if inf.vae_device is not None and not inf.streaming_vae:
        logger.warning("%s: inference.vae_device=%r is ignored because inference.streaming_vae is false",
                       cfg.source, inf.vae_device)
    if inf.kv_quant_comm and cfg.sp_size == 1:
        logger.warning("%s: inference.kv_quant_comm has no effect without sequence parallelism (sp_size: 1)", cfg.source)
    if inf.async_vae and not inf.streaming_vae:
        logger.warning("%s: inference.async_vae is ignored because inference.streaming_vae is false", cfg.source)
    if inf.narrative_rope_phase_shift is not None:
        logger.warning("%s: inference.narrative_rope_phase_shift is accepted for compatibility but has no effect; "
                       "use inference.multi_shot_rope_offset", cfg.source)
    if cfg.training.save_interval == 1 and cfg.origins.get("training.save_interval"):
        logger.warning("%s: training.save_interval=1 (%s) writes a full checkpoint every step",
                       cfg.source, cfg.origins["training.save_interval"])
    if cfg.evaluation.interval == 1 and cfg.origins.get("evaluation.interval"):
        logger.warning("%s: evaluation.interval=1 runs a full evaluation generation every step", cfg.source)


def validate_config(cfg: Config) -> None:
    """Raise ConfigError listing every cross-field problem; log warnings for settings that have no effect."""
    c = _Checker(cfg)
    if not cfg.inference.scene_cut_prefix:
        c.fail("inference.scene_cut_prefix", "must not be empty (every prompt would start a new shot).")
    _check_frames(c)
    _check_cache(c)
    _check_parallel(c)
    _check_weights(c)
    if c.issues:
        raise ConfigError(c.issues, cfg.source)
    _warn(cfg)
