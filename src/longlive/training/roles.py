"""The three networks of DMD (generator, teacher = real score, critic = fake score) over shared bases.

Each role has a base weight source (`generator_ckpt` / `real_score_ckpt` / `fake_score_ckpt`, else
the Wan2.2 DiT; or the one random initialisation of `random_weights`). Roles with the same source
share ONE WanModel: with LoRA the generator and the critic are two PEFT adapters on that model and
the teacher is the model with adapters off, so distillation holds one frozen 5B base instead of
three (spec 6.1/6.2; the reference builds three). Full fine-tuning (no `adapter` section) gives the
trainable roles their own models.

NVFP4 (`infra.<role>_quant`, spec 7.4): a role's quantization recipe and filter are part of its base
key, so only roles quantized alike share a model. A frozen quantized base (LoRA roles, the teacher)
is materialised: FP4 buffers instead of master weights; a trained one keeps fp32 masters.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from longlive.config import Config, ConfigError
from longlive.config.paths import require_path
from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.lora import apply_lora
from longlive.models.wan.state_dict import check_state_dict, load_state_dict
from longlive.parallel.fsdp import load_full_state, shard_model
from longlive.parallel.mesh import ParallelContext

log = logging.getLogger(__name__)

ROLES = ("generator", "real_score", "fake_score")
_CKPT_FIELD = {"generator": "generator_ckpt", "real_score": "real_score_ckpt", "fake_score": "fake_score_ckpt"}


@dataclass
class Role:
    """One DMD network: a (possibly shared) WanModel and the adapter that makes it this role."""

    name: str
    model: WanModel
    adapter: str | None  # None: the model's own (base or fully trained) weights
    trainable: bool

    @property
    def config(self) -> WanConfig:
        return self.model.config

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        # the adapter choice travels with the forward, so activation checkpointing recomputes with it
        return self.model(*args, adapter=self.adapter, **kwargs)

    def text_kv(self, context: torch.Tensor):
        """`WanModel.text_kv` with this role's adapter."""
        return self.model.text_kv(context, adapter=self.adapter)

    def refresh_cache(self, *args, **kwargs) -> None:
        """`WanModel.refresh_cache` with this role's adapter (the rollout's clean refresh)."""
        self.model.refresh_cache(*args, adapter=self.adapter, **kwargs)

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this role trains (its adapter, or the whole model)."""
        if not self.trainable:
            return []
        if self.adapter is None:
            return [p for p in self.model.parameters() if p.requires_grad]
        tag = f".{self.adapter}."
        return [p for n, p in self.model.named_parameters() if tag in n]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """This role's adapter weights by model parameter name (DTensors under FSDP2)."""
        tag = f".{self.adapter}."
        return {n: p for n, p in self.model.named_parameters() if tag in n}


@dataclass
class DMDNetworks:
    generator: Role
    teacher: Role
    critic: Role
    models: list[WanModel] = field(default_factory=list)  # distinct models, in build order

    @property
    def roles(self) -> tuple[Role, Role, Role]:
        return self.generator, self.teacher, self.critic


def weight_source(cfg: Config, role: str) -> str:
    """The base weights of a role: a checkpoint path, the Wan folder, or the shared random init."""
    ck = cfg.checkpoints
    path = getattr(ck, _CKPT_FIELD[role])
    if ck.random_weights:
        if path:
            raise ConfigError(f"{cfg.source}: checkpoints.random_weights is true but checkpoints.{_CKPT_FIELD[role]} "
                              f"is set ({path!r}); choose one")
        return "random"
    if path:
        return str(require_path(cfg, f"checkpoints.{_CKPT_FIELD[role]}", kind="any").resolve())
    from longlive.io.model_folder import resolve_wan_model_folder

    return str(resolve_wan_model_folder(require_path(cfg, "checkpoints.wan_model_dir", kind="dir"),
                                        components=("dit",)).dit_folder.resolve())


def _base_state(source: str, wan_cfg: WanConfig, seed: int, device) -> dict[str, torch.Tensor]:
    if source == "random":
        torch.manual_seed(seed)
        with torch.device(device):
            return WanModel(wan_cfg).state_dict()
    sd, _ = load_state_dict(source)
    with torch.device("meta"):
        check_state_dict(WanModel(wan_cfg), sd, source)
    return sd


def build_networks(cfg: Config, ctx: ParallelContext, seed: int, *, share_base: bool = True,
                   lora_init: dict[str, dict[str, torch.Tensor]] | None = None) -> DMDNetworks:
    """Build the three roles, sharing models between roles whose base weights are the same.

    `share_base=False` builds one model per role even when they could share (the reference's layout,
    for comparison). `lora_init` maps an adapter name to PEFT-layout weights to start from.
    """
    wan_cfg = WanConfig.preset(cfg.model_preset)
    lora = cfg.adapter
    apply_to_critic = lora is not None and lora.apply_to_critic
    adapter_of = {"generator": "generator" if lora else None, "real_score": None,
                  "fake_score": "critic" if apply_to_critic else None}
    trainable = {"generator": True, "real_score": False, "fake_score": True}
    groups: dict[str, list[str]] = {}
    quant_of: dict[str, tuple | None] = {}
    for role in ROLES:
        src = weight_source(cfg, role)
        quant_of[role] = _role_quant(cfg, role)
        base = f"{src}|{quant_of[role]!r}"
        # a role trained in full owns its model; frozen / adapter roles share one per source and quantization
        key = base if (share_base and (adapter_of[role] or not trainable[role])) else f"{base}#{role}"
        groups.setdefault(key, []).append(role)
    roles: dict[str, Role] = {}
    models: list[WanModel] = []
    for key, members in groups.items():
        src = weight_source(cfg, members[0])
        adapters = [adapter_of[r] for r in members if adapter_of[r]]
        frozen_base = all(adapter_of[r] or not trainable[r] for r in members)
        model = _build_model(cfg, ctx, wan_cfg, src, seed, adapters, frozen_base, lora_init or {}, quant_of[members[0]])
        models.append(model)
        for r in members:
            roles[r] = Role(r, model, adapter_of[r], trainable[r])
        log.info("model %d (%s): roles %s, adapters %s, base %s", len(models) - 1, src, members, adapters or "-",
                 "frozen" if frozen_base else "trained")
    return DMDNetworks(roles["generator"], roles["real_score"], roles["fake_score"], models)


def _role_quant(cfg: Config, role: str) -> tuple | None:
    """(recipe, filter) of a role's NVFP4 training quantization, or None."""
    if not getattr(cfg.infra, f"{role}_quant"):
        return None
    from longlive.quant.convert import training_filter, training_recipe

    return training_recipe(cfg, role), training_filter(cfg, role)


def _build_model(cfg: Config, ctx: ParallelContext, wan_cfg: WanConfig, source: str, seed: int, adapters: list[str],
                 frozen_base: bool, lora_init: dict[str, dict[str, torch.Tensor]], quant: tuple | None = None) -> WanModel:
    from longlive.quant.convert import prepare_compact_model, quantize_model
    from longlive.quant.linear import is_quantized_key

    lora = cfg.adapter
    materialize = quant is not None and frozen_base

    def quantize(model: WanModel, empty: bool) -> None:
        if quant is None:
            return
        if materialize and empty:
            prepare_compact_model(model, *quant)
        else:
            quantize_model(model, *quant, materialize=materialize, transposed=bool(adapters))

    def prepare(model: WanModel) -> WanModel:
        for name in adapters:  # each adapter's A init depends only on (seed, adapter), shared base or not
            torch.manual_seed(seed + 17 + ("generator", "critic").index(name))
            apply_lora(model, lora.rank, lora.alpha, lora.dropout, adapter_name=name)
        for n, p in model.named_parameters():
            p.requires_grad_(not frozen_base or "lora_" in n)
        return model

    with torch.device("meta"):
        model = WanModel(wan_cfg)
        quantize(model, empty=True)
        model = prepare(model)
    shard_model(model, ctx, mixed_precision=cfg.infra.mixed_precision,
                gradient_checkpointing=cfg.infra.gradient_checkpointing, compile_blocks=cfg.infra.compile_blocks)
    model.to_empty(device=ctx.device)
    full = None
    if ctx.is_main:
        base = _base_state(source, wan_cfg, seed, ctx.device)
        with torch.device("meta"):
            ref = WanModel(wan_cfg)
        ref.load_state_dict(base, strict=True, assign=True)
        quantize(ref, empty=False)  # from the loaded (fp32 / bf16) base, before LoRA, as the reference does
        ref = prepare(ref)  # LoRA A random, B zero: the adapters start as the identity
        full = {k: v if is_quantized_key(k) else v.float() for k, v in ref.state_dict().items()}
        for name in adapters:
            if name in lora_init:
                _apply_lora_init(full, name, lora_init[name])
        del ref, base
    load_full_state(model, full, ctx)
    return model


def _apply_lora_init(full: dict[str, torch.Tensor], adapter: str, peft_state: dict[str, torch.Tensor]) -> None:
    """Overwrite adapter entries of a full state dict from PEFT-layout weights (`base_model.model.*.lora_A.weight`)."""
    from longlive.models.wan.lora import PEFT_PREFIX

    mine = {k: k.replace(f".{adapter}.", ".") for k in full if f".{adapter}." in k}
    wanted = {PEFT_PREFIX + plain: k for k, plain in mine.items()}
    missing = sorted(set(wanted) - set(peft_state))
    extra = sorted(set(peft_state) - set(wanted))
    if missing or extra:
        raise ConfigError(f"LoRA weights for adapter {adapter!r} do not fit (rank/targets of the `adapter` section): "
                          f"{len(missing)} missing, e.g. {missing[:3]}; {len(extra)} unexpected, e.g. {extra[:3]}")
    for peft_key, key in wanted.items():
        if tuple(peft_state[peft_key].shape) != tuple(full[key].shape):
            raise ConfigError(f"LoRA weight {peft_key}: shape {tuple(peft_state[peft_key].shape)}, the adapter has "
                              f"{tuple(full[key].shape)} (check adapter.rank)")
        full[key] = peft_state[peft_key].float()
