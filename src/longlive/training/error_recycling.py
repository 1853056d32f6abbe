"""Error recycling for teacher-forcing training (SVI-style error buffers, spec 5.5).

Two host-memory buffers hold per-chunk prediction errors keyed by the bucket of the chunk's
training timestep index (and, with position bucketing, by the chunk's local position): a
latent-error buffer (x0_pred - x0) and a noise-error buffer ((v_pred - target) * (1 - sigma)).
`ErrorRecycler.corrupt` adds sampled errors to the clean context, to x0 before noising and to the
noise; `ErrorRecycler.store` records the errors of the step's forward.

Randomness comes only from two CPU `torch.Generator`s passed into every call:

* ``shared_gen`` draws the per-step decisions (clean step, context/latent/noise injection, the
  buffer update on clean steps). It MUST be seeded identically on all ranks of one sequence-parallel
  group (they hold pieces of one clip, so one clip gets one decision), e.g. ``seed + dp_rank``.
  Every `corrupt` call draws exactly 4 numbers from it and every `store` call exactly 1, whatever
  the buffers hold, so the ranks of a group stay in step.
* ``local_gen`` draws everything rank-local: which entry is sampled, modulation factors,
  replacement slots. Seed it per rank, e.g. ``seed + global_rank``.

Both generators belong to the trainer's checkpoint (their `get_state()`), as do the buffers
(`state_dict`), so a resumed run reproduces the same decisions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from longlive.config import ConfigError
from longlive.config.schema import ErrorRecyclingConfig

logger = logging.getLogger(__name__)

FIELD = "training.error_recycling"
STATE_FORMAT = "longlive.error_recycling/1"
BUFFER_KINDS = ("latent", "noise")
ENTRY_DTYPE = torch.bfloat16
_GIB = float(1 << 30)

Key = tuple[int, int]  # (local position (0 without position bucketing), bucket)


@dataclass
class CorruptedInputs:
    """What `ErrorRecycler.corrupt` returns; counts are chunks that actually received an error."""

    x0_in: torch.Tensor     # x0 + latent errors: noise this; the velocity target still uses the true x0
    noise_in: torch.Tensor  # epsilon' = noise + noise errors: noise with it AND use it in the target (eps' - x0)
    context: torch.Tensor   # clean context for teacher forcing, + context errors
    clean_step: bool        # injections skipped by clean_prob; pass to `store(clean_step=...)`
    context_injected: int = 0
    latent_injected: int = 0
    noise_injected: int = 0


class ErrorRecycler:
    """Latent- and noise-error buffers of one rank, with injection into and storage from a training step.

    Latents are ``[B, C, F, H, W]`` with ``F = chunks * frames_per_chunk``; one entry is one chunk
    ``[C, frames_per_chunk, H, W]`` kept in bf16 on the host (or on the training device with
    ``cfg.buffer_device: device``). With ``cfg.enabled`` false every
    method is a pass-through that stores nothing, draws nothing and never calls ``gather``.
    """

    def __init__(self, cfg: ErrorRecyclingConfig, *, chunk_shape: Sequence[int], num_chunks_total: int,
                 frames_per_chunk: int = 8, num_train_timesteps: int = 1000, sp_rank: int = 0, sp_size: int = 1,
                 gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 device: torch.device | str = "cpu") -> None:
        """`chunk_shape` is (C, H, W) of the latent; `num_chunks_total` counts the chunks of the whole clip
        (all SP ranks); `gather` concatenates a tensor along dim 0 over the warm-up group (None: one process).
        `device` is the training device, which holds the buffers when `cfg.buffer_device` is "device".
        Raises ConfigError when full host buffers could exceed `cfg.host_memory_budget_gib`."""
        if len(tuple(chunk_shape)) != 3 or min(int(s) for s in chunk_shape) < 1:
            raise ValueError(f"ErrorRecycler: chunk_shape must be (C, H, W) of positive sizes, got {tuple(chunk_shape)}")
        if frames_per_chunk < 1 or num_chunks_total < 1 or num_train_timesteps < 1:
            raise ValueError(f"ErrorRecycler: frames_per_chunk ({frames_per_chunk}), num_chunks_total "
                             f"({num_chunks_total}) and num_train_timesteps ({num_train_timesteps}) must be >= 1")
        if sp_size < 1 or not 0 <= sp_rank < sp_size:
            raise ValueError(f"ErrorRecycler: sp_rank {sp_rank} is not in [0, sp_size={sp_size})")
        self.cfg = cfg
        c, h, w = (int(s) for s in chunk_shape)
        self.entry_shape = (c, int(frames_per_chunk), h, w)
        self.entry_bytes = c * frames_per_chunk * h * w * ENTRY_DTYPE.itemsize
        self.frames_per_chunk = int(frames_per_chunk)
        self.num_chunks_total = int(num_chunks_total)
        self.num_train_timesteps = int(num_train_timesteps)
        self.sp_rank, self.sp_size = int(sp_rank), int(sp_size)
        self._gather = gather
        self.enabled = bool(cfg.enabled)
        self.buffer_device = torch.device(device) if cfg.buffer_device == "device" else torch.device("cpu")
        self._stats = {"added": 0, "replaced": 0, "ignored_not_owned": 0, "ignored_invalid": 0,
                       "skipped_clean_updates": 0}
        self._buffers: dict[str, dict[Key, list[torch.Tensor]]] = {k: {} for k in BUFFER_KINDS}
        self.owned_buckets: list[int] = []
        self.num_positions = 1
        self.global_block_offset = 0
        if not self.enabled:
            return
        self._validate_config()
        nb = cfg.num_buckets
        self.owned_buckets = [k for k in range(nb) if k % self.sp_size == self.sp_rank]
        self._owned = set(self.owned_buckets)
        owned = torch.tensor(self.owned_buckets)
        # nearest owned bucket for every bucket (ties go to the lower bucket)
        self._remap = owned[(torch.arange(nb)[:, None] - owned[None, :]).abs().argmin(dim=1)]
        if cfg.enable_position_bucketing:
            self.num_positions = self.num_chunks_total // self.sp_size
            self.global_block_offset = self.sp_rank * self.num_positions
        self._check_budget()
        logger.info("error recycling: %d owned buckets x %d positions x %d entries of %.2f MiB, "
                    "worst case %.2f GiB on %s for both buffers", len(self.owned_buckets), self.num_positions,
                    cfg.buffer_size_per_bucket, self.entry_bytes / 2**20, self.worst_case_bytes() / _GIB,
                    self.buffer_device)

    # ------------------------------------------------------------------ configuration

    def _validate_config(self) -> None:
        cfg, issues = self.cfg, []
        for name in ("context_inject_prob", "latent_inject_prob", "noise_inject_prob", "clean_prob",
                     "clean_buffer_update_prob", "modulate_factor"):
            value = getattr(cfg, name)
            if not 0.0 <= value <= 1.0:
                issues.append(f"{FIELD}.{name}: {value} is outside [0, 1]")
        if cfg.replacement_strategy not in ("random", "fifo", "l2"):
            issues.append(f"{FIELD}.replacement_strategy: {cfg.replacement_strategy!r} is not one of random, fifo, l2")
        if cfg.buffer_size_per_bucket < 1:
            issues.append(f"{FIELD}.buffer_size_per_bucket: must be >= 1, got {cfg.buffer_size_per_bucket}")
        if not 1 <= cfg.num_buckets <= self.num_train_timesteps:
            issues.append(f"{FIELD}.num_buckets: {cfg.num_buckets} must be in [1, num_train_timesteps="
                          f"{self.num_train_timesteps}]")
        elif cfg.num_buckets < self.sp_size:
            issues.append(f"{FIELD}.num_buckets: {cfg.num_buckets} is below sequence_parallel_size {self.sp_size}; "
                          "buckets are sharded over SP ranks (bucket % sp_size == sp_rank), so every rank needs one")
        if cfg.enable_position_bucketing and self.num_chunks_total % self.sp_size:
            issues.append(f"{FIELD}.enable_position_bucketing: {self.num_chunks_total} chunks per clip are not "
                          f"divisible by sequence_parallel_size {self.sp_size}")
        if issues:
            raise ConfigError(issues)

    def worst_case_bytes(self) -> int:
        """Host bytes of both buffers when every owned (position, bucket) is full; 0 when disabled."""
        if not self.enabled:
            return 0
        return (len(self.owned_buckets) * self.num_positions * self.cfg.buffer_size_per_bucket
                * self.entry_bytes * len(BUFFER_KINDS))

    def _check_budget(self) -> None:
        cfg = self.cfg
        if self.buffer_device.type != "cpu":
            return  # device buffers: an out-of-memory error names the device
        worst = self.worst_case_bytes()
        budget = cfg.host_memory_budget_gib * _GIB
        if worst <= budget:
            return
        per_entry_set = len(self.owned_buckets) * self.num_positions * self.entry_bytes * len(BUFFER_KINDS)
        max_size = int(budget // per_entry_set)
        hint = (f"lower {FIELD}.buffer_size_per_bucket to at most {max_size}" if max_size >= 1 else
                f"not even one entry per bucket fits; lower {FIELD}.num_buckets")
        positions = f" x {self.num_positions} positions" if cfg.enable_position_bucketing else ""
        raise ConfigError(
            f"{FIELD}: full error buffers could take {worst / _GIB:.1f} GiB of host RAM on this rank "
            f"({len(self.owned_buckets)} owned buckets of {FIELD}.num_buckets={cfg.num_buckets} with sp_size="
            f"{self.sp_size}{positions} x {FIELD}.buffer_size_per_bucket={cfg.buffer_size_per_bucket} x "
            f"{self.entry_bytes / 2**20:.2f} MiB per chunk x 2 buffers), above "
            f"{FIELD}.host_memory_budget_gib={cfg.host_memory_budget_gib}; {hint}, "
            f"or raise {FIELD}.host_memory_budget_gib if the host has the RAM")

    # ------------------------------------------------------------------ inputs

    def buckets_of(self, t_index: torch.Tensor) -> torch.Tensor:
        """Bucket of each training timestep index: floor(i / (num_train_timesteps / num_buckets))."""
        t = t_index.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"ErrorRecycler: timestep indices must lie in [0, {self.num_train_timesteps}), "
                             f"got [{int(t.min())}, {int(t.max())}]")
        return (t * self.cfg.num_buckets) // self.num_train_timesteps

    def _check_step_inputs(self, x: torch.Tensor, t_index: torch.Tensor,
                           chunk_positions: torch.Tensor) -> tuple[int, int, list[int]]:
        """Validate shapes; return (B, chunks on this rank, global chunk positions)."""
        if x.dim() != 5:
            raise ValueError(f"ErrorRecycler: latents must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        b, c, f, h, w = x.shape
        positions = [int(p) for p in chunk_positions.reshape(-1).tolist()]
        n = len(positions)
        expected = (c, n * self.frames_per_chunk, h, w)
        if (c, f, h, w) != expected or (c, self.frames_per_chunk, h, w) != self.entry_shape:
            raise ValueError(f"ErrorRecycler: latents {tuple(x.shape)} do not match {n} chunks of "
                             f"{self.entry_shape} (C, frames_per_chunk, H, W)")
        if tuple(t_index.shape) != (b, n):
            raise ValueError(f"ErrorRecycler: t_index must be [B, chunks] = {(b, n)}, got {tuple(t_index.shape)}")
        for p in positions:
            if not 0 <= p < self.num_chunks_total:
                raise ValueError(f"ErrorRecycler: chunk position {p} is outside [0, {self.num_chunks_total})")
            if self.cfg.enable_position_bucketing and not 0 <= p - self.global_block_offset < self.num_positions:
                raise ValueError(f"ErrorRecycler: chunk position {p} is not one of SP rank {self.sp_rank}'s chunks "
                                 f"[{self.global_block_offset}, {self.global_block_offset + self.num_positions})")
        return b, n, positions

    def _position_key(self, global_position: int) -> int:
        return global_position - self.global_block_offset if self.cfg.enable_position_bucketing else 0

    def _to_chunks(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[B, C, n*fpc, H, W] -> [B*n, C, fpc, H, W] (row b*n + j is chunk j of sample b)."""
        b, c, _, h, w = x.shape
        return x.reshape(b, c, n, self.frames_per_chunk, h, w).transpose(1, 2).reshape(
            b * n, c, self.frames_per_chunk, h, w)

    # ------------------------------------------------------------------ injection

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, t_index: torch.Tensor, chunk_positions: torch.Tensor,
                step: int, shared_gen: torch.Generator, local_gen: torch.Generator, *,
                context: Optional[torch.Tensor] = None) -> CorruptedInputs:
        """Inject sampled errors for this step. `context` is the clean context before injection
        (e.g. noise-augmented x0; default x0). Inputs are not modified. Draws 4 numbers from shared_gen."""
        base_context = x0 if context is None else context
        if not self.enabled:
            return CorruptedInputs(x0, noise, base_context, False)
        b, n, positions = self._check_step_inputs(x0, t_index, chunk_positions)
        for name, t in (("noise", noise), ("context", base_context)):
            if t.shape != x0.shape:
                raise ValueError(f"ErrorRecycler: {name} shape {tuple(t.shape)} differs from x0 {tuple(x0.shape)}")
        cfg = self.cfg
        u_clean, u_context, u_latent, u_noise = _draws(shared_gen, 4)
        active = step >= cfg.start_step
        clean_step = active and u_clean < cfg.clean_prob
        inject = active and not clean_step
        out = CorruptedInputs(x0, noise, base_context, clean_step)
        if not inject:
            return out

        # chunks eligible for injection, as flat rows b*n + j
        rows = [(bi * n + j, bi, j) for bi in range(b) for j in range(n)
                if not (cfg.skip_block_0 and positions[j] == 0)]
        buckets = self._remap[self.buckets_of(t_index.cpu())].tolist()

        def timestep_pools() -> list[tuple[int, list[Key]]]:
            return [(row, [(self._position_key(positions[j]), buckets[bi][j])]) for row, bi, j in rows]

        if u_noise < cfg.noise_inject_prob:
            out.noise_in, out.noise_injected = self._inject(noise, n, "noise", timestep_pools(), local_gen)
        if u_latent < cfg.latent_inject_prob:
            out.x0_in, out.latent_injected = self._inject(x0, n, "latent", timestep_pools(), local_gen)
        if u_context < cfg.context_inject_prob:
            # any timestep: the whole buffer (1-D) or every bucket at the chunk's position (2-D)
            by_position: dict[int, list[Key]] = {}
            for key in self._buffers["latent"]:
                by_position.setdefault(key[0], []).append(key)
            for keys in by_position.values():
                keys.sort()
            pools = [(row, by_position.get(self._position_key(positions[j]), [])) for row, _, j in rows]
            out.context, out.context_injected = self._inject(base_context, n, "latent", pools, local_gen)
        return out

    def _inject(self, x: torch.Tensor, n: int, kind: str, pools: list[tuple[int, list[Key]]],
                local_gen: torch.Generator) -> tuple[torch.Tensor, int]:
        """Add to chunk `row` an entry drawn uniformly from the union of its pool's keys, times U(1-m, 1+m).
        One host->device copy for all chunks; chunks whose pool is empty are left as they are."""
        buffer = self._buffers[kind]
        sized = [(row, keys, sum(len(buffer.get(k, ())) for k in keys)) for row, keys in pools]
        sized = [s for s in sized if s[2] > 0]
        if not sized:
            return x, 0
        picks = torch.rand(len(sized), generator=local_gen, dtype=torch.float64).tolist()
        m = self.cfg.modulate_factor
        scales = torch.empty(len(sized), dtype=torch.float32).uniform_(1.0 - m, 1.0 + m, generator=local_gen)
        entries = []
        for (row, keys, total), u in zip(sized, picks):
            i = min(int(u * total), total - 1)
            for k in keys:
                size = len(buffer.get(k, ()))
                if i < size:
                    entries.append(buffer[k][i])
                    break
                i -= size
        errors = torch.stack(entries).to(device=x.device).to(x.dtype)
        errors = errors * scales.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
        rows = torch.tensor([s[0] for s in sized], device=x.device)
        delta = torch.zeros((x.shape[0] * n, *self.entry_shape), device=x.device, dtype=x.dtype)
        delta.index_copy_(0, rows, errors)  # rows are distinct chunks
        b, c, f, h, w = x.shape
        delta = delta.reshape(b, n, c, self.frames_per_chunk, h, w).transpose(1, 2).reshape(b, c, f, h, w)
        return x + delta, len(sized)

    # ------------------------------------------------------------------ storage

    def store(self, latent_error: torch.Tensor, noise_error: torch.Tensor, t_index: torch.Tensor,
              chunk_positions: torch.Tensor, step: int, shared_gen: torch.Generator, local_gen: torch.Generator,
              *, clean_step: bool, chunk_valid: Optional[torch.Tensor] = None) -> None:
        """Record this step's errors: latent_error = x0_pred - x0, noise_error = (v_pred - target)*(1 - sigma),
        both [B, C, F, H, W]. While step <= buffer_warmup_iter, `gather` is called exactly twice on every rank
        (payload, then metadata) whatever this rank decides. `clean_step` is `CorruptedInputs.clean_step`;
        `chunk_valid` ([B, chunks] bool) drops padded chunks. Draws 1 number from shared_gen."""
        if not self.enabled:
            return
        b, n, positions = self._check_step_inputs(latent_error, t_index, chunk_positions)
        if noise_error.shape != latent_error.shape:
            raise ValueError(f"ErrorRecycler: noise_error shape {tuple(noise_error.shape)} differs from "
                             f"latent_error {tuple(latent_error.shape)}")
        if chunk_valid is not None and tuple(chunk_valid.shape) != (b, n):
            raise ValueError(f"ErrorRecycler: chunk_valid must be [B, chunks] = {(b, n)}, "
                             f"got {tuple(chunk_valid.shape)}")
        (u_update,) = _draws(shared_gen, 1)
        update = (not clean_step) or u_update < self.cfg.clean_buffer_update_prob

        device = latent_error.device
        with torch.no_grad():
            payload = torch.stack([self._to_chunks(latent_error.detach(), n),
                                   self._to_chunks(noise_error.detach(), n)], dim=1).to(ENTRY_DTYPE).contiguous()
            valid = (torch.ones(b, n, dtype=torch.bool) if chunk_valid is None else chunk_valid.detach().cpu().bool())
            meta = torch.stack([torch.tensor(positions, dtype=torch.long).expand(b, n),
                                self.buckets_of(t_index.detach().cpu()),
                                valid.long()], dim=-1).reshape(b * n, 3).to(device)
            if self._gather is not None and step <= self.cfg.buffer_warmup_iter:
                payload = self._gather(payload)
                meta = self._gather(meta)
                if payload.shape[0] != meta.shape[0] or payload.shape[1:] != (2, *self.entry_shape):
                    raise RuntimeError(f"ErrorRecycler: gather returned payload {tuple(payload.shape)} and metadata "
                                       f"{tuple(meta.shape)}; expected [N, 2, {', '.join(map(str, self.entry_shape))}]"
                                       " and [N, 3] concatenated along dim 0")
        if not update:
            self._stats["skipped_clean_updates"] += 1
            return
        stored = payload.to(self.buffer_device)
        for row, (position, bucket, ok) in enumerate(meta.cpu().tolist()):
            if not ok:
                self._stats["ignored_invalid"] += 1
                continue
            if bucket not in self._owned:
                self._stats["ignored_not_owned"] += 1
                continue
            pos_key = self._position_key(position)
            if not 0 <= pos_key < self.num_positions:
                raise RuntimeError(f"ErrorRecycler: received chunk position {position}, which is not one of SP rank "
                                   f"{self.sp_rank}'s chunks; with position bucketing `gather` must run over the "
                                   "data-parallel group (ranks with the same sp_rank)")
            for i, kind in enumerate(BUFFER_KINDS):
                self._add(kind, (pos_key, bucket), stored[row, i].clone(), local_gen)

    def _add(self, kind: str, key: Key, entry: torch.Tensor, local_gen: torch.Generator) -> None:
        """Append, or replace per `replacement_strategy` when the (position, bucket) is full."""
        entries = self._buffers[kind].setdefault(key, [])
        capacity = self.cfg.buffer_size_per_bucket
        if len(entries) < capacity:
            entries.append(entry)
            self._stats["added"] += 1
            return
        strategy = self.cfg.replacement_strategy
        if strategy == "fifo":  # lists are kept oldest first
            entries.pop(0)
            entries.append(entry)
        elif strategy == "random":
            entries[int(torch.randint(len(entries), (1,), generator=local_gen))] = entry
        else:  # l2: replace the stored entry most similar to the new one
            new = entry.float()
            distances = torch.stack([torch.sum((e.float() - new) ** 2) for e in entries])
            entries[int(distances.argmin())] = entry
        self._stats["replaced"] += 1

    # ------------------------------------------------------------------ inspection

    def entry_counts(self, kind: str = "latent") -> dict[Key, int]:
        """Number of stored entries per (local position, bucket) of one buffer ("latent" or "noise")."""
        return {key: len(v) for key, v in sorted(self._buffers[kind].items()) if v}

    def stats(self) -> dict[str, int]:
        """Counters for logging: entries per buffer, host bytes held, adds, replacements and ignored chunks."""
        out = dict(self._stats)
        for kind in BUFFER_KINDS:
            out[f"{kind}_entries"] = sum(len(v) for v in self._buffers[kind].values())
        out["host_bytes"] = (out["latent_entries"] + out["noise_entries"]) * self.entry_bytes
        return out

    # ------------------------------------------------------------------ persistence

    def _geometry(self) -> dict:
        return {"entry_shape": list(self.entry_shape), "num_buckets": int(self.cfg.num_buckets) if self.enabled else 0,
                "num_train_timesteps": self.num_train_timesteps, "sp_rank": self.sp_rank, "sp_size": self.sp_size,
                "position_bucketing": bool(self.cfg.enable_position_bucketing) if self.enabled else False,
                "num_positions": self.num_positions, "global_block_offset": self.global_block_offset}

    def state_dict(self) -> dict:
        """Buffers and counters of this rank (save one file per sp_rank); loadable with weights_only=True."""
        buffers = {}
        for kind in BUFFER_KINDS:
            keys, entries = [], []
            for key, values in sorted(self._buffers[kind].items()):
                keys.extend([list(key)] * len(values))
                entries.extend(v.cpu() for v in values)
            buffers[kind] = {"keys": torch.tensor(keys, dtype=torch.long).reshape(-1, 2), "entries": entries}
        return {"format": STATE_FORMAT, "geometry": self._geometry(), "buffers": buffers, "stats": dict(self._stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restore buffers saved by `state_dict`; refuses another geometry, SP layout or position offset."""
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        if found != STATE_FORMAT:
            raise ValueError(f"ErrorRecycler: not an error-buffer state (format {found!r}, expected {STATE_FORMAT!r})")
        if not self.enabled:
            stored = sum(len(state["buffers"][kind]["entries"]) for kind in BUFFER_KINDS)
            if stored:  # dropping them silently would lose them at the next save
                raise ValueError(f"ErrorRecycler: the checkpoint holds {stored} error-buffer entries but "
                                 f"{FIELD}.enabled is false; enable it to resume with them")
            return  # a run without error recycling resumes its own (empty) state
        saved, ours = state["geometry"], self._geometry()
        diffs = [f"{k}: saved {saved.get(k)!r}, this run {v!r}" for k, v in ours.items() if saved.get(k) != v]
        if diffs:
            raise ValueError("ErrorRecycler: error buffers were saved with another geometry / SP layout / "
                             "position-bucketing offset (load the file of the same sp_rank with the same "
                             "settings, or start with empty buffers): " + "; ".join(diffs))
        restored: dict[str, dict[Key, list[torch.Tensor]]] = {k: {} for k in BUFFER_KINDS}
        for kind in BUFFER_KINDS:
            keys, entries = state["buffers"][kind]["keys"], state["buffers"][kind]["entries"]
            if keys.shape[0] != len(entries):
                raise ValueError(f"ErrorRecycler: {kind} buffer has {keys.shape[0]} keys but {len(entries)} entries")
            for (pos, bucket), entry in zip(keys.tolist(), entries):
                if bucket not in self._owned or not 0 <= pos < self.num_positions:
                    raise ValueError(f"ErrorRecycler: {kind} entry keyed (position {pos}, bucket {bucket}) is not "
                                     f"owned by SP rank {self.sp_rank}")
                if tuple(entry.shape) != self.entry_shape:
                    raise ValueError(f"ErrorRecycler: {kind} entry of shape {tuple(entry.shape)}, expected "
                                     f"{self.entry_shape}")
                restored[kind].setdefault((pos, bucket), []).append(entry.to(self.buffer_device, ENTRY_DTYPE))
            for key, values in restored[kind].items():
                if len(values) > self.cfg.buffer_size_per_bucket:
                    raise ValueError(f"ErrorRecycler: saved {kind} bucket {key} holds {len(values)} entries, more "
                                     f"than {FIELD}.buffer_size_per_bucket={self.cfg.buffer_size_per_bucket}; "
                                     "raise it to resume with these buffers")
        self._buffers = restored
        self._stats.update({k: int(v) for k, v in state.get("stats", {}).items() if k in self._stats})


def _draws(gen: torch.Generator, count: int) -> list[float]:
    """`count` uniforms in [0, 1) from a CPU generator (the only source of randomness here)."""
    if gen.device.type != "cpu":
        raise ValueError(f"ErrorRecycler: generators must be CPU torch.Generators, got one on {gen.device}")
    return torch.rand(count, generator=gen, dtype=torch.float64).tolist()

