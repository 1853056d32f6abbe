"""The self-attention KV cache for chunk-by-chunk generation: every rule about what stays in it.

Storage is preallocated once: `k` and `v` are `[layers, batch, heads, slots * chunk_tokens, head_dim]`
(head-major, the layout attention kernels read without a copy) and never move. A *slot* holds one chunk. Keys are stored after RoPE (absolute positions), so
attention over the cached keys does not depend on their order; a full cache is attended as one
contiguous view and eviction simply reuses the evicted chunk's slot (a ring buffer without copies).

Semantics (reference spec 2.3-2.6), per sample, in chunk units:
- capacity = `window_frames / chunk_frames` slots (`window_frames=-1`: the whole video, no eviction);
- the first `sink_frames` of the video are the sink; with `multi_shot_sink` they are the *global* sink;
- a scene cut (chunk index > 0) advances the shot index; the temporal RoPE position of every new
  frame is `(frame + shot_index * rope_offset_per_shot) * t_scale`, so each cut leaves a gap;
- with `multi_shot_sink` and a sink, the cut chunk is *pinned* after its refresh (replacing any old
  pin); a pin right after the global sink is protected, a pin further back "floats" (it is not
  protected, older chunks before it are evicted first, so it slides forward until it is protected);
- when a new chunk does not fit, the oldest unprotected chunk is evicted: protected are the global
  sink plus a protected pin, or, without a pin, the classic sink of `sink_frames`;
- `shot_clean_recache`: at a cut, before the refresh, everything but the global sink is dropped,
  so the new shot only sees the global sink.
Bookkeeping is plain Python integers (no device synchronisation in the chunk loop).

`kv_quant=True` stores the slots in NVFP4 (`longlive.quant.fp4_kv.FP4KVStore`, about 3.56x smaller):
a chunk is quantized once, when the refresh writes its clean K/V; the denoising steps attend to the
FP4 slots plus the current chunk's own K/V in full precision, through one fused kernel on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attention import sdpa
from .config import WanConfig
from .rope import rope_cos_sin


@dataclass
class _SampleState:
    order: list[int] = field(default_factory=list)  # physical slots, oldest first
    chunk_of_slot: dict[int, int] = field(default_factory=dict)  # physical slot -> chunk index
    pin: int | None = None  # physical slot of the pinned shot anchor
    shot_index: int = 0
    current_slot: int = -1
    current_cut: bool = False


class KVCache:
    """Fixed-size per-layer K/V storage plus the sink / window / pin / RoPE-offset rules."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        chunk_frames: int = 8,
        window_frames: int = 32,
        sink_frames: int = 0,
        multi_shot_sink: bool = False,
        rope_offset_per_shot: float = 0.0,
        t_scale: float = 1.0,
        shot_clean_recache: bool = False,
        max_frames: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        kv_quant: bool = False,
        kv_quant_rule: str = "mse",
        key_smoothing: str = "channel_mean",
        kv_quant_backend: str = "cuda",
        kv_quant_group=None,
        kv_quant_comm: bool = False,
    ) -> None:
        if chunk_frames <= 0 or tokens_per_frame <= 0:
            raise ValueError(f"KVCache: chunk_frames ({chunk_frames}) and tokens_per_frame ({tokens_per_frame}) must be positive")
        if sink_frames < 0 or sink_frames % chunk_frames:
            raise ValueError(f"KVCache: sink_frames={sink_frames} must be a non-negative multiple of chunk_frames={chunk_frames}")
        if window_frames == -1:
            if max_frames is None:
                raise ValueError("KVCache: window_frames=-1 (global attention) needs max_frames, the video length in latent frames")
            window_frames = -(-max_frames // chunk_frames) * chunk_frames
        if window_frames <= 0 or window_frames % chunk_frames:
            raise ValueError(f"KVCache: window_frames={window_frames} must be -1 or a positive multiple of chunk_frames={chunk_frames}")
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.tokens_per_frame, self.chunk_frames = tokens_per_frame, chunk_frames
        self.chunk_tokens = chunk_frames * tokens_per_frame
        self.num_slots = window_frames // chunk_frames
        self.sink_slots = sink_frames // chunk_frames
        self.global_slots = self.sink_slots if multi_shot_sink else 0
        self.pins_enabled = bool(multi_shot_sink and sink_frames > 0)
        needed = self.sink_slots + (1 if self.pins_enabled else 0) + 1
        if self.num_slots < needed:
            raise ValueError(
                f"KVCache: a window of {window_frames} frames ({self.num_slots} chunks) cannot hold the sink "
                f"({self.sink_slots} chunks){', the shot pin (1 chunk)' if self.pins_enabled else ''} and the new chunk; "
                f"use window_frames >= {needed * chunk_frames} or a smaller sink"
            )
        self.rope_offset_per_shot = float(rope_offset_per_shot)
        self.t_scale = float(t_scale)
        self.shot_clean_recache = bool(shot_clean_recache)
        self.fp4 = None
        if kv_quant:
            from longlive.quant.fp4_kv import FP4KVStore

            if kv_quant_backend not in ("cuda", "triton", "pytorch"):
                raise ValueError(f"KVCache: kv_quant_backend must be cuda, triton or pytorch, got {kv_quant_backend!r}")
            # cuda: Triton writes + dequantize-then-cuDNN attention (fastest measured); triton: the fused
            # FP4 attention kernel (no BF16 copy of the window); pytorch: the reference path on any device
            self.fp4 = FP4KVStore(num_layers, batch_size, num_heads, head_dim, self.num_slots, self.chunk_tokens,
                                  rule=kv_quant_rule, key_smoothing=key_smoothing, device=device,
                                  backend="torch" if kv_quant_backend == "pytorch" else "auto", group=kv_quant_group)
            self._fp4_dequantize = kv_quant_backend == "cuda" and self.fp4.backend == "triton"
            if kv_quant_comm and kv_quant_backend == "triton":
                raise ValueError("KVCache: kv_quant_comm reads the current chunk from its FP4 slot, which the fused "
                                 "triton attention does not; use kv_quant_backend cuda or pytorch")
            self.k = self.v = None
        else:
            if kv_quant_comm:
                raise ValueError("KVCache: kv_quant_comm (FP4 K/V in the sequence-parallel all-to-all) needs kv_quant")
            shape = (num_layers, batch_size, num_heads, self.num_slots * self.chunk_tokens, head_dim)
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        self.kv_quant_comm = bool(kv_quant_comm)
        self._kv_quant_args = (kv_quant_rule, key_smoothing, kv_quant_group)
        self._fp4_stage = None
        self.device = torch.device(device)
        self.reset()

    @classmethod
    def for_model(
        cls,
        config: WanConfig,
        *,
        batch_size: int,
        latent_height: int,
        latent_width: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        head_shards: int = 1,
        **kwargs,
    ) -> "KVCache":
        """A cache sized for `config` at a latent resolution (tokens/frame = H/ph * W/pw); with
        `head_shards=sp` it holds 1/sp of the heads (one rank of a sequence-parallel group)."""
        _, ph, pw = config.patch_size
        if latent_height % ph or latent_width % pw:
            raise ValueError(f"latent size {latent_height}x{latent_width} is not divisible by the patch size {config.patch_size}")
        if config.num_heads % head_shards:
            raise ValueError(f"KVCache: {head_shards} head shards do not divide the {config.num_heads} attention heads")
        return cls(
            num_layers=config.num_layers, batch_size=batch_size, num_heads=config.num_heads // head_shards,
            head_dim=config.head_dim,
            tokens_per_frame=(latent_height // ph) * (latent_width // pw), dtype=dtype, device=device, **kwargs,
        )

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget everything (start of a new video); storage is kept."""
        self.samples = [_SampleState() for _ in range(self.batch_size)]
        self.num_valid = 0  # valid slots are always the physical prefix [0, num_valid)
        self.start_frame = -1
        self.next_frame = 0
        self._positions: torch.Tensor | None = None
        self._rope: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None
        self._refreshing = False

    @property
    def nbytes(self) -> int:
        if self.fp4 is not None:
            return self.fp4.nbytes
        return self.k.numel() * self.k.element_size() * 2

    def fill_random_(self, generator: torch.Generator | None = None) -> None:
        """Random contents in every slot (benchmarks: a full window without computing it)."""
        if self.fp4 is None:
            self.k.normal_(generator=generator)
            self.v.normal_(generator=generator)
            return
        shape = (self.batch_size, self.num_heads, self.chunk_tokens, self.head_dim)
        for layer in range(self.num_layers):
            for slot in range(self.num_slots):
                k, v = (torch.randn(shape, generator=generator, device=self.device).to(torch.bfloat16) for _ in range(2))
                self.fp4.write(layer, [slot] * self.batch_size, k, v)

    def begin_chunk(self, start_frame: int, scene_cut: bool | Sequence[bool] = False) -> None:
        """Make room for the chunk starting at latent frame `start_frame` (chunks must come in order)."""
        if start_frame != self.next_frame:
            raise ValueError(f"KVCache.begin_chunk: expected the chunk starting at frame {self.next_frame}, got {start_frame}")
        cuts = [bool(scene_cut)] * self.batch_size if isinstance(scene_cut, bool) else [bool(c) for c in scene_cut]
        if len(cuts) != self.batch_size:
            raise ValueError(f"KVCache.begin_chunk: {len(cuts)} scene-cut flags for a batch of {self.batch_size}")
        chunk_index = start_frame // self.chunk_frames
        full = self.num_valid == self.num_slots
        for s, cut in zip(self.samples, cuts):
            cut = cut and chunk_index > 0
            if full:
                victim = s.order.pop(self._protected_prefix(s))
                del s.chunk_of_slot[victim]
                slot = victim
            else:
                slot = self.num_valid
            s.order.append(slot)
            s.chunk_of_slot[slot] = chunk_index
            s.current_slot = slot
            s.current_cut = cut
            if cut:
                s.shot_index += 1
        if not full:
            self.num_valid += 1
        self.start_frame = start_frame
        self.next_frame = start_frame + self.chunk_frames
        self._positions = None
        self._rope = None
        self._refreshing = False

    def _protected_prefix(self, s: _SampleState) -> int:
        if s.pin is not None:
            return self.global_slots + 1 if s.order.index(s.pin) == self.global_slots else self.global_slots
        return max(self.global_slots, self.sink_slots)

    def prepare_refresh(self) -> None:
        """Call between the last denoising step and the refresh: applies `shot_clean_recache` at cuts.
        The refresh's K/V are the ones an FP4 cache stores."""
        self._refreshing = True
        if not self.shot_clean_recache or not any(s.current_cut for s in self.samples):
            return
        if not all(s.current_cut for s in self.samples):
            raise ValueError("shot_clean_recache needs the scene cuts of all samples in a batch to coincide")
        chunk_index = self.start_frame // self.chunk_frames
        for s in self.samples:
            keep = s.order[: self.global_slots]
            s.order = keep + [self.global_slots]
            s.chunk_of_slot = {slot: s.chunk_of_slot[slot] for slot in keep}
            s.chunk_of_slot[self.global_slots] = chunk_index
            s.current_slot = self.global_slots
            s.pin = None
        self.num_valid = self.global_slots + 1

    def end_chunk(self) -> None:
        """Call after the refresh: pins the chunk where a scene cut happened (multi-shot sink)."""
        self._refreshing = False
        if self.pins_enabled:
            for s in self.samples:
                if s.current_cut:
                    s.pin = s.current_slot

    # ------------------------------------------------------------------ model interface
    def frame_positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Temporal RoPE positions `[B, chunk_frames]` (float64) of the current chunk's frames."""
        if self.start_frame < 0:
            raise RuntimeError("KVCache: call begin_chunk() before running the model with the cache")
        if self._positions is None:
            # (start + i + shot * offset) * t_scale, in float64 and in that order, computed on the device: a
            # tensor built from a Python list would be copied from pageable memory, which waits for the stream
            frame = torch.arange(self.chunk_frames, dtype=torch.float64, device=device or self.device) + self.start_frame
            self._positions = torch.stack([(frame + s.shot_index * self.rope_offset_per_shot) * self.t_scale
                                           for s in self.samples])
        return self._positions

    def rope_tables(self, config: WanConfig, height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin of the current chunk, computed once per chunk (not once per denoising step)."""
        if self._rope is None or self._rope[0] != (height, width):
            cos, sin = rope_cos_sin(config, self.frame_positions(device), height, width)
            self._rope = ((height, width), cos, sin)
        return self._rope[1], self._rope[2]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention of the current chunk `q/k/v [B, chunk_tokens, H, D]` over the window (writing the
        chunk's K/V into its slot); returns `[B, chunk_tokens, H, D]`."""
        if self.fp4 is None:
            kc, vc = self.update(layer, k, v)
            return sdpa(q, kc, vc, kv_heads_first=True)
        return self._attend_fp4(layer, q, k, v)

    @torch.compiler.disable  # slot bookkeeping and Triton launches: one opaque step in a compiled block
    def _attend_fp4(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.shape[1] != self.chunk_tokens:
            raise ValueError(f"KVCache.attend: got {k.shape[1]} tokens, the cache holds chunks of {self.chunk_tokens}")
        slots = [s.current_slot for s in self.samples]
        kc, vc = k.transpose(1, 2), v.transpose(1, 2)
        if self._refreshing:
            self.fp4.write(layer, slots, kc, vc)
        attend = self.fp4.attention_dequantized if self._fp4_dequantize else self.fp4.attention
        return attend(layer, q, kc.contiguous(), vc.contiguous(), self.num_valid, slots)

    def fp4_stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Sender side of the FP4 all-to-all: quantize this rank's tokens `k, v [B, S/sp, H_all, D]` (all
        heads of its 1/sp of the chunk's tokens) with the channel mean and amax of the whole chunk
        (reduced over the SP group), exactly as the receiving head-sharded caches would. Returns
        `FP4KVStore.packed` of the staged chunk (codes and scales `[B, H_all, S/sp, *]`)."""
        b, t, h, d = k.shape
        if self._fp4_stage is None or self._fp4_stage.chunk_tokens != t or self._fp4_stage.num_heads != h:
            from longlive.quant.fp4_kv import FP4KVStore

            rule, smoothing, group = self._kv_quant_args
            self._fp4_stage = FP4KVStore(1, b, h, d, 1, t, rule=rule, key_smoothing=smoothing, device=k.device,
                                         backend=self.fp4.backend, group=group, shard="tokens")
        self._fp4_stage.write(0, [0] * b, k.transpose(1, 2), v.transpose(1, 2))
        return self._fp4_stage.packed(0, 0)

    @torch.compiler.disable
    def attend_received(self, layer: int, q: torch.Tensor, k_values, k_scales, v_values, v_scales, k_decode, v_decode,
                        k_mean) -> torch.Tensor:
        """Receiver side of the FP4 all-to-all: store the chunk's quantized K/V (this rank's heads, all tokens)
        in the current slots at every call (the refresh's stay), then attend over the window with the
        current chunk read from FP4 too."""
        slots = [s.current_slot for s in self.samples]
        self.fp4.write_packed(layer, slots, k_values, k_scales, v_values, v_scales, k_decode, v_decode, k_mean)
        return self.fp4.attention_from_slots(layer, q, self.num_valid, slots,
                                             route="dequantize" if self.fp4.backend == "triton" else "reference")

    def shared_slot(self) -> bool:
        """Whether every sample writes the current chunk into the same slot (the usual case: samples only
        diverge after different scene cuts or recaches); `chunk_views` needs it."""
        return self.fp4 is None and all(s.current_slot == self.samples[0].current_slot for s in self.samples)

    @torch.compiler.disable
    def chunk_views(self, layer: int) -> tuple[torch.Tensor, ...]:
        """`(k_dst, v_dst, k_window, v_window)` for `layer`: the current chunk's slot `[B, H, chunk_tokens, D]`,
        to be written by the caller, and all valid K/V `[B, H, valid_tokens, D]` (views, no copy)."""
        if not self.shared_slot():
            raise ValueError("KVCache.chunk_views: the samples write different slots; use update()")
        a = self.samples[0].current_slot * self.chunk_tokens
        n = self.num_valid * self.chunk_tokens
        kb, vb = self.k[layer], self.v[layer]
        return kb[:, :, a : a + self.chunk_tokens], vb[:, :, a : a + self.chunk_tokens], kb[:, :, :n], vb[:, :, :n]

    @torch.compiler.disable  # host-side slot bookkeeping: a compiled block calls it as one opaque step
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the current chunk's K/V `[B, chunk_tokens, H, D]` for `layer`; return all valid K/V
        head-major, `[B, H, valid_tokens, D]` (views of the storage, no copy)."""
        if k.shape[1] != self.chunk_tokens:
            raise ValueError(f"KVCache.update: got {k.shape[1]} tokens, the cache holds chunks of {self.chunk_tokens}")
        kb, vb = self.k[layer], self.v[layer]
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        slots = [s.current_slot for s in self.samples]
        n = self.num_valid * self.chunk_tokens
        if all(x == slots[0] for x in slots):
            a = slots[0] * self.chunk_tokens
            kb[:, :, a : a + self.chunk_tokens] = k
            vb[:, :, a : a + self.chunk_tokens] = v
        else:
            for b, slot in enumerate(slots):
                a = slot * self.chunk_tokens
                kb[b, :, a : a + self.chunk_tokens] = k[b]
                vb[b, :, a : a + self.chunk_tokens] = v[b]
        return kb[:, :, :n], vb[:, :, :n]

    def grad_window(self) -> "GradWindow":
        """A view for a forward WITH gradient (DMD exit steps): the current chunk's K/V are spliced into the
        window out of place and nothing is written, and the slot layout is frozen now, so activation
        checkpointing recomputes the same window after the rollout has moved on. The chunk's own K/V are
        written later by the (no-grad) refresh."""
        if self.fp4 is not None:
            raise ValueError("KVCache: forwards with gradient need a full-precision cache (kv_quant is for inference)")
        return GradWindow(self.k, self.v, [s.current_slot for s in self.samples], self.num_valid * self.chunk_tokens,
                          self.chunk_tokens)

    # ------------------------------------------------------------------ introspection (tests, logs)
    def attended_chunks(self, sample: int = 0) -> list[int]:
        """Chunk indices the current chunk attends to, oldest first (its own index last)."""
        s = self.samples[sample]
        return [s.chunk_of_slot[slot] for slot in s.order]

    def pinned_chunk(self, sample: int = 0) -> int | None:
        s = self.samples[sample]
        return None if s.pin is None else s.chunk_of_slot.get(s.pin)

    def shot_index(self, sample: int = 0) -> int:
        return self.samples[sample].shot_index


class GradWindow:
    """See `KVCache.grad_window`. Valid while the slots it reads are not reused (the rollout window covers the clip)."""

    def __init__(self, k, v, slots: list[int], valid_tokens: int, chunk_tokens: int) -> None:
        self.k, self.v, self.slots, self.n, self.ct = k, v, slots, valid_tokens, chunk_tokens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.update(layer, k, v)
        return sdpa(q, kc, vc, kv_heads_first=True)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for buf, cur in ((self.k[layer], k.transpose(1, 2)), (self.v[layer], v.transpose(1, 2))):
            rows = []
            for b, slot in enumerate(self.slots):
                a = slot * self.ct
                rows.append(torch.cat([buf[b, :, :a], cur[b], buf[b, :, a + self.ct : self.n]], dim=1))
            outs.append(torch.stack(rows))
        return outs[0], outs[1]
