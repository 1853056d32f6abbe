"""Typed schema of a longlive configuration (field names as in the reference LongLive 2.0 YAML files).

One dataclass per YAML section. Values are kept as written (None = "not set, use the derived
default"); resolved values (effective sink size, number of chunks, model preset, ...) are
properties of `Config`, so `Config.to_dict()` round-trips exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

DEFAULT_SCENE_CUT_PREFIX = "The scene transitions. "

# The standard Wan negative prompt (used by the reference when a config gives none).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
    "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# User-facing model names -> DiT preset names (`longlive.models.wan.config.PRESETS`).
MODEL_NAME_TO_PRESET = {
    "Wan2.2-TI2V-5B": "wan2.2-ti2v-5b",
    "wan2.2-ti2v-5b": "wan2.2-ti2v-5b",
    "tiny": "tiny",
    "synth": "synth",
}

# Checkpoint `checkpoint_format` tags of exports that already contain the LoRA (merged).
MERGED_CHECKPOINT_FORMATS = (
    "longlive_generator_merged_lora",
    "longlive_generator_nvfp4",
    "longlive_generator_merged_bf16",
)
REJECTED_CHECKPOINT_FORMATS = ("longlive_generator_te_nvfp4",)

SCALE_RULES = ("static_6", "static_4", "mse", "mae", "abs_max")
PROMPT_LENGTH_POLICIES = ("error", "truncate", "pad_last", "fit")


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, choices: tuple | None = None,
       min: float | None = None, max: float | None = None, scalar_to_list: bool = False, doc: str = "") -> Any:
    """A dataclass field with validation metadata (allowed values, numeric range, scalar-to-list)."""
    meta = {"choices": choices, "min": min, "max": max, "scalar_to_list": scalar_to_list, "doc": doc}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _internal(default: Any = None, factory: Any = dataclasses.MISSING) -> Any:
    """Bookkeeping attribute that is not part of the YAML schema (excluded from to_dict and equality)."""
    meta = {"internal": True}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, compare=False, repr=False, metadata=meta)
    return field(default=default, compare=False, repr=False, metadata=meta)


@dataclass
class ModelKwargs:
    """`model_kwargs`: construction arguments of the causal DiT wrapper."""

    model_name: str = _f("Wan2.2-TI2V-5B", choices=tuple(MODEL_NAME_TO_PRESET),
                         doc="Wan2.2-TI2V-5B (real model), synth (the demo-model preset) or tiny (test preset)")
    text_encoder: str = _f("auto", choices=("auto", "umt5", "hash"),
                           doc="auto: the weight-free hash encoder for the tiny and synth presets, UMT5-XXL otherwise")
    timestep_shift: float = _f(5.0, min=0.0)
    num_frame_per_block: int = _f(8, min=1, doc="latent frames per AR chunk")
    local_attn_size: int = _f(-1, min=-1, doc="attention window in latent frames; -1 = whole video")
    sink_size: int = _f(0, min=0, doc="attention sink in latent frames (fallback for inference.sink_size)")
    t_scale: float = _f(1.0)
    rope_method: str = _f("linear")


@dataclass
class DataConfig:
    """`data`: datasets and prompt inputs, latent shape."""

    data_path: Optional[str] = _f(None, doc="prompt .txt / multi-shot folder (inference) or dataset root (training)")
    eval_data_path: Optional[str] = _f(None)
    image_or_video_shape: list[int] = _f(factory=lambda: [1, 128, 48, 44, 80], doc="latent [B, F, C, H, W]")
    load_raw_video: bool = _f(True)
    max_chunks_per_shot: int = _f(0, min=0, doc="virtual scene cut after this many chunks of one video (0 = off)")
    chunks_per_shot: Optional[int] = _f(None, min=1, doc="chunks per shot when a prompt folder has no shot_durations.txt")
    allow_padding: bool = _f(False)
    min_latent_frames: int = _f(0, min=0)
    uniform_prompt: bool = _f(False)
    filter_invalid_folders: bool = _f(False)
    dataset_type: str = _f("auto", choices=("auto", "videos", "latents", "synthetic", "procedural"),
                           doc="training data: auto = videos if load_raw_video else latents (`longlive data encode` output); "
                               "synthetic = generated latents (tests, benchmarks); procedural = the `longlive data synth` "
                               "world rendered in memory (no files)")
    synthetic_samples: int = _f(64, min=1, doc="number of samples of the synthetic and procedural datasets")
    procedural_seed: int = _f(0, min=0, doc="procedural dataset: the `data synth --seed` whose samples it renders")
    procedural_shot_frames: int = _f(97, min=1, doc="procedural dataset: frames per shot (`data synth --frames`)")
    procedural_max_shots: int = _f(3, min=1, max=3, doc="procedural dataset: shots per sample (`data synth --max-shots`)")
    num_workers: int = _f(2, min=0, doc="DataLoader worker processes for training data")
    prompt_length_mismatch: str = _f("error", choices=PROMPT_LENGTH_POLICIES,
                                     doc="when shot durations do not sum to the number of chunks")


@dataclass
class InferenceConfig:
    """`inference`: sampling, KV cache (sink/window/multi-shot), decoding and output options."""

    sampling_steps: int = _f(4, min=1)
    guidance_scale: float = _f(1.0)
    negative_prompt: str = _f(DEFAULT_NEGATIVE_PROMPT)
    sink_size: Optional[int] = _f(None, min=0, doc="None = model_kwargs.sink_size")
    local_attn_size: Optional[int] = _f(None, min=-1, doc="None = model_kwargs.local_attn_size")
    multi_shot_sink: bool = _f(False)
    multi_shot_rope_offset: int = _f(0, min=0)
    shot_clean_recache: bool = _f(False)
    scene_cut_prefix: str = _f(DEFAULT_SCENE_CUT_PREFIX)
    independent_first_frame: bool = _f(False)
    use_relative_rope: bool = _f(False)
    inference_t_scale: float = _f(1.0)
    rope_method: Optional[str] = _f(None)
    narrative_rope_phase_shift: Optional[int] = _f(None, doc="accepted for compatibility; never used")
    kv_quant: bool = _f(False)
    kv_quant_scale_rule: str = _f("mse", choices=SCALE_RULES)
    kv_quant_backend: str = _f("cuda", choices=("cuda", "triton", "pytorch"),
                               doc="cuda = Triton writes + dequantize-then-cuDNN (fastest); triton = fused FP4 attention "
                                   "kernel (no BF16 window copy); pytorch = reference path (any device)")
    kv_quant_key_smoothing: str = _f("channel_mean", choices=("channel_mean", "token_mean", "none"),
                                     doc="channel_mean: softmax-invariant (mean re-added); token_mean: the reference's "
                                         "per-token shift (changes attention; compatibility only)")
    kv_quant_comm: bool = _f(False, doc="sequence-parallel inference with kv_quant: send K and V through the "
                                       "all-to-all as NVFP4 (3.6x fewer bytes; the current chunk then attends to "
                                       "its own K/V quantized)")
    streaming_vae: bool = _f(False)
    async_vae: bool = _f(False)
    vae_type: str = _f("wan", choices=("wan", "mg_lightvae", "mg_lightvae_v2", "tiny", "patchify"),
                       doc="patchify: weight-free exact space-to-depth (4x4x4 pixels per latent cell, z_dim 192; demo models)")
    vae_device: Optional[str] = _f(None, doc="dedicated VAE device for streaming decode; None = same device")
    sp_vae_decode: str = _f("rows", choices=("rows", "writer"),
                            doc="sequence-parallel inference with streaming_vae (no vae_device): rows = every rank of "
                                "the group decodes a band of latent rows of each chunk (the bands are gathered on the "
                                "writer rank); writer = the group's first rank decodes alone")
    use_ema: bool = _f(False)
    output_folder: str = _f("videos/longlive2")
    num_samples: int = _f(1, min=1)
    num_output_frames: Optional[int] = _f(None, min=1, doc="None = data.image_or_video_shape[1]")
    save_latents_only: bool = _f(False)
    save_with_index: bool = _f(False)
    inference_iter: int = _f(-1, min=-1, doc="stop after this many prompts (-1 = all)")


@dataclass
class CheckpointsConfig:
    """`checkpoints`: weight files. Running without a generator checkpoint needs `random_weights: true`."""

    generator_ckpt: Optional[str] = _f(None)
    lora_ckpt: Optional[str] = _f(None)
    real_score_ckpt: Optional[str] = _f(None)
    fake_score_ckpt: Optional[str] = _f(None)
    random_weights: bool = _f(False, doc="explicitly run with randomly initialised generator weights")
    wan_model_dir: str = _f("wan_models/Wan2.2-TI2V-5B", doc="Wan2.2-TI2V-5B components (DiT, UMT5, VAE)")
    lightvae_dir: str = _f("wan_models/Matrix-Game-3.0", doc="MG-LightVAE checkpoints")


@dataclass
class AdapterConfig:
    """`adapter`: LoRA settings; the section's presence enables LoRA."""

    type: str = _f("lora", choices=("lora",))
    rank: int = _f(128, min=1)
    alpha: float = _f(128.0, min=0.0)
    dropout: float = _f(0.0, min=0.0, max=1.0)
    apply_to_critic: bool = _f(True)
    verbose: bool = _f(False)
    dtype: Optional[str] = _f(None, choices=(None, "bfloat16", "float16", "float32"))


@dataclass
class LoggingConfig:
    """`logging`: seed and experiment tracking."""

    seed: int = _f(0, min=0, doc="0 = random seed broadcast from rank 0 in training")
    wandb_key: Optional[str] = _f(None)
    wandb_entity: Optional[str] = _f(None)
    wandb_project: Optional[str] = _f(None)
    wandb_host: str = _f("https://api.wandb.ai")
    tensorboard: bool = _f(True, doc="write TensorBoard scalars to <logdir>/tensorboard during training")
    use_wandb: bool = _f(False, doc="also log to wandb (needs the wandb package and a key)")
    log_interval: int = _f(1, min=1, doc="scalar logging interval in steps")


_WRAP = ("size", "transformer")


@dataclass
class InfraConfig:
    """`infra`: distribution (FSDP, sequence parallel), memory, and NVFP4 training quantization."""

    sequence_parallel_size: int = _f(1, min=1)
    sharding_strategy: str = _f("hybrid_full", choices=("hybrid_full", "full", "hybrid_zero2", "no_shard"))
    mixed_precision: bool = _f(True)
    gradient_checkpointing: bool = _f(True)
    vae_halo_latents: int = _f(28, min=0)
    sp_layout: str = _f("balanced", choices=("balanced", "plain"),
                        doc="balanced: each rank holds clean+noisy copies of its chunks; plain: split [clean; noisy] contiguously")
    compile_blocks: bool = _f(False, doc="torch.compile each transformer block during training")
    generator_fsdp_wrap_strategy: str = _f("size", choices=_WRAP)
    real_score_fsdp_wrap_strategy: str = _f("size", choices=_WRAP)
    fake_score_fsdp_wrap_strategy: str = _f("size", choices=_WRAP)
    text_encoder_fsdp_wrap_strategy: str = _f("size", choices=_WRAP)
    # DMD role quantization (spec 7.8): <role>_quant and its rules / filters.
    generator_quant: bool = _f(False)
    generator_quant_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    generator_quant_activation_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    generator_quant_weight_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    generator_quant_gradient_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    generator_quant_filtered_modules: Optional[list[str]] = _f(None)
    generator_quant_use_default_filtered_modules: bool = _f(True)
    real_score_quant: bool = _f(False)
    real_score_quant_materialize: bool = _f(False)
    real_score_quant_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    real_score_quant_activation_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    real_score_quant_weight_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    real_score_quant_gradient_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    real_score_quant_filtered_modules: Optional[list[str]] = _f(None)
    real_score_quant_use_default_filtered_modules: bool = _f(True)
    fake_score_quant: bool = _f(False)
    fake_score_quant_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    fake_score_quant_activation_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    fake_score_quant_weight_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    fake_score_quant_gradient_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    fake_score_quant_filtered_modules: Optional[list[str]] = _f(None)
    fake_score_quant_use_default_filtered_modules: bool = _f(True)


@dataclass
class AlgorithmConfig:
    """`algorithm`: training objective (AR teacher forcing or DMD score distillation)."""

    trainer: str = _f("diffusion", choices=("diffusion", "score_distillation"))
    causal: Optional[bool] = _f(None, doc="None = True (diffusion) / all_causal (DMD)")
    teacher_forcing: Optional[bool] = _f(None, doc="None = True for diffusion, False for DMD")
    num_train_timestep: int = _f(1000, min=1)
    denoising_loss_type: str = _f("flow", choices=("flow",))
    distribution_loss: str = _f("dmd", choices=("dmd",))
    all_causal: bool = _f(True)
    ts_schedule: bool = _f(False)
    real_guidance_scale: float = _f(3.0)
    fake_guidance_scale: float = _f(0.0)
    backward_simulation: bool = _f(True)
    same_step_across_blocks: bool = _f(True)
    context_noise: float = _f(0.0, min=0.0)
    warp_denoising_step: bool = _f(False)
    denoising_step_list: Optional[list[int]] = _f(None, doc="only used by off-policy DMD (backward_simulation: false)")


@dataclass
class ErrorRecyclingConfig:
    """`training.error_recycling`: SVI-style error buffers (spec 5.5)."""

    enabled: bool = _f(False)
    num_buckets: int = _f(50, min=1)
    buffer_size_per_bucket: int = _f(500, min=1)
    buffer_warmup_iter: int = _f(50, min=0)
    context_inject_prob: float = _f(0.9, min=0.0, max=1.0)
    latent_inject_prob: float = _f(0.9, min=0.0, max=1.0)
    noise_inject_prob: float = _f(0.01, min=0.0, max=1.0)
    clean_prob: float = _f(0.2, min=0.0, max=1.0)
    clean_buffer_update_prob: float = _f(0.1, min=0.0, max=1.0)
    modulate_factor: float = _f(0.3, min=0.0, max=1.0)
    start_step: int = _f(0, min=0)
    replacement_strategy: str = _f("random", choices=("random", "fifo", "l2"))
    enable_position_bucketing: bool = _f(False)
    skip_block_0: bool = _f(False)
    host_memory_budget_gib: float = _f(32.0, min=0.0,
                                       doc="refuse to start if full buffers could exceed this much host RAM per rank")
    buffer_device: str = _f("cpu", choices=("cpu", "device"),
                            doc="where the buffers live: cpu (host RAM, the reference) or device (the training GPU: "
                                "no per-step host copies; for models whose buffers fit beside them)")


@dataclass
class TrainingConfig:
    """`training`: optimiser, schedule, checkpointing, DMD rollout lengths."""

    lr: float = _f(1.0e-5, min=0.0)
    lr_critic: float = _f(2.0e-6, min=0.0)
    weight_decay: float = _f(0.0, min=0.0)
    beta1: float = _f(0.0, min=0.0, max=1.0)
    beta2: float = _f(0.999, min=0.0, max=1.0)
    beta1_critic: float = _f(0.0, min=0.0, max=1.0)
    beta2_critic: float = _f(0.999, min=0.0, max=1.0)
    max_grad_norm_generator: float = _f(10.0, min=0.0)
    max_grad_norm_critic: float = _f(10.0, min=0.0)
    batch_size: int = _f(1, min=1)
    gradient_accumulation_steps: int = _f(1, min=1)
    ema_weight: Optional[float] = _f(0.99, min=0.0, max=1.0, doc="None disables EMA")
    ema_start_step: int = _f(100, min=0)
    save_interval: int = _f(100, min=1, doc="checkpoint every N steps (legacy name: log_iters)")
    export_generator: bool = _f(True, doc="with every checkpoint, also write the full generator (and EMA) for inference")
    max_checkpoints: int = _f(20, min=1)
    max_iters: int = _f(600, min=1)
    max_minutes: Optional[float] = _f(None, min=0.0, doc="also stop (saving a checkpoint) after this much wall-clock "
                                                         "time of this run's steps; None = no time limit")
    gc_interval: int = _f(100, min=1)
    dfake_gen_update_ratio: int = _f(5, min=1)
    min_num_training_frames: int = _f(32, min=1)
    num_training_frames: int = _f(32, min=1)
    slice_last_frames: int = _f(32, min=1)
    error_recycling: ErrorRecyclingConfig = _f(factory=ErrorRecyclingConfig)


@dataclass
class EvaluationConfig:
    """`evaluation`: generation during training (its own interval, separate from checkpoint saving)."""

    interval: int = _f(500, min=0, doc="evaluate every N steps (0 = never)")
    num_frames: list[int] = _f(factory=lambda: [32], scalar_to_list=True, doc="latent frames per eval video")
    use_ema: bool = _f(False)
    val_batch_size: int = _f(1, min=1)
    save_latents_only: bool = _f(True)


@dataclass
class Config:
    """A complete longlive configuration: sections plus the reference's top-level keys."""

    model_kwargs: ModelKwargs = _f(factory=ModelKwargs)
    real_model_kwargs: Optional[ModelKwargs] = _f(None, doc="None = model_kwargs")
    fake_model_kwargs: Optional[ModelKwargs] = _f(None, doc="None = model_kwargs")
    data: DataConfig = _f(factory=DataConfig)
    inference: InferenceConfig = _f(factory=InferenceConfig)
    checkpoints: CheckpointsConfig = _f(factory=CheckpointsConfig)
    adapter: Optional[AdapterConfig] = _f(None, doc="present = LoRA enabled")
    logging: LoggingConfig = _f(factory=LoggingConfig)
    infra: InfraConfig = _f(factory=InfraConfig)
    algorithm: AlgorithmConfig = _f(factory=AlgorithmConfig)
    training: TrainingConfig = _f(factory=TrainingConfig)
    evaluation: EvaluationConfig = _f(factory=EvaluationConfig)

    # ---- top-level keys -------------------------------------------------------------------------
    i2v: bool = _f(False)
    merge_lora: bool = _f(False)
    fp8_quant: bool = _f(False)
    model_quant: bool = _f(False)
    model_quant_use_transformer_engine: bool = _f(False)
    model_quant_te_inference_only: Optional[bool] = _f(None, doc="None = model_quant_use_transformer_engine")
    model_quant_te_low_precision_weights: Optional[bool] = _f(None, doc="None = te_inference_only")
    model_quant_te_fallback_to_fouroversix: bool = _f(False)
    model_quant_te_recipe_kwargs: Optional[dict[str, Any]] = _f(None)
    model_quant_te_module_kwargs: Optional[dict[str, Any]] = _f(None)
    model_quant_scale_rule: str = _f("static_6", choices=SCALE_RULES)
    model_quant_activation_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    model_quant_weight_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    model_quant_gradient_scale_rule: Optional[str] = _f(None, choices=(None,) + SCALE_RULES)
    model_quant_backend: Optional[str] = _f(
        None, choices=(None, "emulated", "weight_only", "transformer_engine", "fouroversix", "cuda", "triton", "pytorch"),
        doc="None/cuda/triton/pytorch = emulated W4A4 (exact NVFP4 numerics; Triton kernels on CUDA); weight_only = "
            "packed FP4 weights with BF16 activations")
    model_quant_filtered_modules: Optional[list[str]] = _f(None)
    model_quant_use_default_filtered_modules: bool = _f(True)
    torch_compile: Union[bool, str] = _f("auto", choices=(True, False, "auto"))
    torch_compile_min_samples: int = _f(2, min=0)
    torch_compile_target: str = _f("generator_model", choices=("generator_model", "model"))
    torch_compile_backend: str = _f("inductor")
    torch_compile_mode: Optional[str] = _f("max-autotune-no-cudagraphs")
    torch_compile_fullgraph: bool = _f(False)
    torch_compile_dynamic: bool = _f(False)
    torch_compile_suppress_errors: bool = _f(True)
    torch_compile_options: Optional[dict[str, Any]] = _f(None)
    sp_size: int = _f(1, min=1, doc="sequence-parallel group size for SP inference")
    dp_size: int = _f(1, min=1)
    auto_sp_remainder: bool = _f(False)
    model_num_heads: Optional[int] = _f(None, min=1, doc="None = number of heads of the model preset")

    # ---- bookkeeping (not part of the YAML) -----------------------------------------------------
    source: Optional[str] = _internal(None)
    origins: dict[str, str] = _internal(factory=dict)

    # ---- resolved values ------------------------------------------------------------------------
    @property
    def model_preset(self) -> str:
        """DiT preset name for `longlive.models.wan.config.WanConfig.preset`."""
        return MODEL_NAME_TO_PRESET[self.model_kwargs.model_name]

    @property
    def num_heads(self) -> int:
        """Attention heads of the model (model_num_heads, else from the preset)."""
        if self.model_num_heads is not None:
            return self.model_num_heads
        from longlive.models.wan.config import WanConfig  # lazy: keep config importable without torch

        return WanConfig.preset(self.model_preset).num_heads

    @property
    def frames_per_chunk(self) -> int:
        """Latent frames per AR chunk (model_kwargs.num_frame_per_block)."""
        return self.model_kwargs.num_frame_per_block

    @property
    def latent_frames(self) -> int:
        """Latent frames to generate: inference.num_output_frames, else data.image_or_video_shape[1]."""
        if self.inference.num_output_frames is not None:
            return self.inference.num_output_frames
        return int(self.data.image_or_video_shape[1])

    @property
    def num_chunks(self) -> int:
        """Number of AR chunks of the generated video."""
        return self.latent_frames // self.frames_per_chunk

    @property
    def sink_size(self) -> int:
        """Effective attention sink in latent frames: inference.sink_size, else model_kwargs.sink_size."""
        if self.inference.sink_size is not None:
            return self.inference.sink_size
        return self.model_kwargs.sink_size

    @property
    def local_attn_size(self) -> int:
        """Effective attention window in latent frames (-1 = global): inference, else model_kwargs."""
        if self.inference.local_attn_size is not None:
            return self.inference.local_attn_size
        return self.model_kwargs.local_attn_size

    @property
    def use_lora(self) -> bool:
        """LoRA is enabled when an `adapter` section is present."""
        return self.adapter is not None

    @property
    def teacher_forcing(self) -> bool:
        """Resolved algorithm.teacher_forcing (True for AR diffusion, False for DMD unless set)."""
        if self.algorithm.teacher_forcing is not None:
            return self.algorithm.teacher_forcing
        return self.algorithm.trainer == "diffusion"

    @property
    def causal(self) -> bool:
        """Resolved algorithm.causal (DMD default: all_causal)."""
        if self.algorithm.causal is not None:
            return self.algorithm.causal
        return self.algorithm.all_causal if self.algorithm.trainer == "score_distillation" else True

    def role_model_kwargs(self, role: str) -> ModelKwargs:
        """Model kwargs for `generator`, `real_score` or `fake_score` (role overrides fall back to model_kwargs)."""
        if role == "generator":
            return self.model_kwargs
        if role == "real_score":
            return self.real_model_kwargs or self.model_kwargs
        if role == "fake_score":
            return self.fake_model_kwargs or self.model_kwargs
        raise ValueError(f"unknown model role {role!r}; expected generator, real_score or fake_score")

    def to_dict(self) -> dict[str, Any]:
        """Canonical nested dict (every field, sections as in the reference YAML); loads back to an equal Config."""
        from longlive.config.load import config_to_dict

        return config_to_dict(self)


# Sections whose keys the reference flattens into one top-level namespace (spec 8, normalize_config).
FLATTENED_SECTIONS = ("infra", "algorithm", "training", "data", "inference", "logging", "checkpoints")
# Sections that keep their own namespace.
NESTED_SECTIONS = ("model_kwargs", "real_model_kwargs", "fake_model_kwargs", "adapter", "evaluation")
