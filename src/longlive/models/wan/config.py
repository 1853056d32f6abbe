"""Configuration of the Wan2.2 diffusion transformer (field names as in the original config.json)."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys that appear in original / diffusers config.json files but carry no architecture information.
_METADATA_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "model_type", "window_size", "_comment"}
# diffusers WanTransformer3DModel config keys -> ours.
_DIFFUSERS_KEYS = {
    "num_attention_heads": "num_heads",
    "in_channels": "in_dim",
    "out_channels": "out_dim",
    "freq_dim": "freq_dim",
    "ffn_dim": "ffn_dim",
    "num_layers": "num_layers",
    "text_dim": "text_dim",
    "patch_size": "patch_size",
    "eps": "eps",
    "cross_attn_norm": "cross_attn_norm",
    "qk_norm": "qk_norm",
}
_DIFFUSERS_IGNORED = {"image_dim", "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len"}


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan DiT. Defaults are Wan2.2-TI2V-5B."""

    dim: int = 3072
    ffn_dim: int = 14336
    freq_dim: int = 256
    text_dim: int = 4096
    num_heads: int = 24
    num_layers: int = 30
    in_dim: int = 48
    out_dim: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = field(default=10000.0)
    # What the output head predicts. "flow": the velocity noise - x0 (every Wan checkpoint). "sample": the
    # clean latent x0, turned into the same velocity by `forward` (see `SAMPLE_MIN_SIGMA`), for pixel-space
    # models whose patch tokens are wider than the model (the `synth` preset: 768 values per token in 192
    # dims), which cannot carry the per-pixel noise a velocity holds (Li & He 2025, "Back to Basics: Let
    # Denoising Generative Models Denoise").
    prediction: str = "flow"

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"WanConfig.patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"WanConfig head_dim={self.head_dim} must be even and >= 6 for 3-axis RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim={self.freq_dim} must be even")
        if self.prediction not in ("flow", "sample"):
            raise ValueError(f"WanConfig.prediction={self.prediction!r} must be 'flow' or 'sample'")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Number of complex pairs for the (time, height, width) axes: 22/21/21 for head_dim 128."""
        hw = self.head_dim // 6
        return (self.head_dim // 2 - 2 * hw, hw, hw)

    @staticmethod
    def preset(name: str) -> "WanConfig":
        """A named architecture: `wan2.2-ti2v-5b`, `synth` (the demo model) or `tiny` (same code paths, for tests and CPU demos)."""
        key = name.strip().lower()
        if key not in PRESETS:
            close = difflib.get_close_matches(key, PRESETS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown Wan model preset {name!r}; known presets: {sorted(PRESETS)}.{hint}")
        return PRESETS[key]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "WanConfig":
        """Build from an original Wan or a diffusers `WanTransformer3DModel` config dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        is_diffusers = "num_attention_heads" in data or data.get("_class_name") == "WanTransformer3DModel"
        unknown = []
        for key, value in data.items():
            if key in _METADATA_KEYS or (is_diffusers and key in _DIFFUSERS_IGNORED):
                continue
            if is_diffusers and key in _DIFFUSERS_KEYS:
                key = _DIFFUSERS_KEYS[key]
            if is_diffusers and key == "attention_head_dim":
                continue
            if key not in names:
                unknown.append(key)
                continue
            kwargs[key] = value
        if unknown:
            raise ValueError(f"{source}: unknown Wan config keys {unknown}; known keys: {sorted(names)}")
        if is_diffusers:
            if "attention_head_dim" in data:
                kwargs["dim"] = int(data["attention_head_dim"]) * int(kwargs.get("num_heads", cls.num_heads))
            qk = kwargs.get("qk_norm", "rms_norm_across_heads")
            if qk not in (None, "rms_norm_across_heads", True, False):
                raise ValueError(f"{source}: qk_norm={qk!r} is not supported (only 'rms_norm_across_heads')")
            kwargs["qk_norm"] = bool(qk)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "WanConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Original Wan config.json fields."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d.pop("rope_theta")
        if self.prediction == "flow":  # not a field of the original Wan config.json
            d.pop("prediction")
        return {"_class_name": "WanModel", "model_type": "ti2v", **d}

    def to_diffusers_dict(self) -> dict[str, Any]:
        """diffusers `WanTransformer3DModel` config fields."""
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_dim,
            "out_channels": self.out_dim,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if self.qk_norm else None,
            "eps": self.eps,
            # diffusers has no text_len field (Wan always pads to 512); keep ours when it differs
            **({"text_len": self.text_len} if self.text_len != 512 else {}),
            **({"prediction": self.prediction} if self.prediction != "flow" else {}),
        }


PRESETS: dict[str, WanConfig] = {
    "wan2.2-ti2v-5b": WanConfig(),
    # 2 heads of 32 -> RoPE pairs (6, 5, 5), exercising the same split code as 128 -> (22, 21, 21).
    "tiny": WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=2, num_layers=2,
                      in_dim=48, out_dim=48, text_len=16),
    # the shipped demo model: pixel-space latents of the patchify VAE (3 x 4 x 4 x 4 = 192 channels)
    "synth": WanConfig(dim=192, ffn_dim=768, freq_dim=64, text_dim=64, num_heads=3, num_layers=6,
                       in_dim=192, out_dim=192, text_len=48, prediction="sample"),
}
