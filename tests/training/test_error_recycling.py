"""Error recycling buffers (spec 5.5): every config field's effect, SP sharding, determinism, persistence."""
from __future__ import annotations

import io
import sys

import pytest
import torch

from longlive.config import ConfigError
from longlive.config.schema import ErrorRecyclingConfig
from longlive.training.error_recycling import ErrorRecycler

C, FPC, H, W = 2, 2, 3, 2  # tiny chunk: 2 channels, 2 frames, 3x2 latent pixels
T = 100                    # training timesteps; 4 buckets of 25 indices by default


def make_cfg(**overrides) -> ErrorRecyclingConfig:
    base = dict(enabled=True, num_buckets=4, buffer_size_per_bucket=8, buffer_warmup_iter=0,
                context_inject_prob=0.0, latent_inject_prob=0.0, noise_inject_prob=0.0, clean_prob=0.0,
                clean_buffer_update_prob=0.0, modulate_factor=0.0, start_step=0, replacement_strategy="fifo",
                host_memory_budget_gib=1.0)
    base.update(overrides)
    return ErrorRecyclingConfig(**base)


def make(cfg=None, *, n_total=4, sp_rank=0, sp_size=1, gather=None, timesteps=T, **overrides) -> ErrorRecycler:
    return ErrorRecycler(cfg if cfg is not None else make_cfg(**overrides), chunk_shape=(C, H, W),
                         num_chunks_total=n_total, frames_per_chunk=FPC, num_train_timesteps=timesteps,
                         sp_rank=sp_rank, sp_size=sp_size, gather=gather)


def gens(seed=0):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(10_000 + seed)


def chunked(values) -> torch.Tensor:
    """[B, C, n*FPC, H, W] whose chunk j of sample b is the constant values[b][j]."""
    v = torch.tensor(values, dtype=torch.float32)  # [B, n]
    b, n = v.shape
    return v[:, None, :, None, None, None].expand(b, C, n, FPC, H, W).reshape(b, C, n * FPC, H, W).clone()


def chunk_values(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] constant value of every chunk (asserts each chunk is constant)."""
    b = x.shape[0]
    chunks = x.reshape(b, C, n, FPC, H, W).transpose(1, 2).reshape(b, n, -1)
    assert torch.equal(chunks.amin(-1), chunks.amax(-1)), "chunk is not constant"
    return chunks[..., 0]


def positions(n, start=0):
    return torch.arange(start, start + n)


def store(rec, lat_values, t_index, *, noise_values=None, pos=None, step=10, clean_step=False, g=None, **kw):
    lat = chunked(lat_values)
    noise = chunked(noise_values if noise_values is not None else lat_values)
    t = torch.tensor(t_index)
    n = t.shape[1]
    shared, local = g if g is not None else gens(99)
    rec.store(lat, noise, t, pos if pos is not None else positions(n), step, shared, local,
              clean_step=clean_step, **kw)


def corrupt(rec, t_index, *, pos=None, step=10, g=None, x0=None, noise=None, **kw):
    t = torch.tensor(t_index)
    b, n = t.shape
    x0 = x0 if x0 is not None else torch.zeros(b, C, n * FPC, H, W)
    noise = noise if noise is not None else torch.zeros(b, C, n * FPC, H, W)
    shared, local = g if g is not None else gens(1)
    return rec.corrupt(x0, noise, t, pos if pos is not None else positions(n), step, shared, local, **kw)


def stored_values(rec, kind, key):
    state = rec.state_dict()["buffers"][kind]
    return [float(e.float().mean()) for k, e in zip(state["keys"].tolist(), state["entries"]) if tuple(k) == key]


# ---------------------------------------------------------------- enabled


def test_disabled_recycler_is_a_pass_through():
    calls = []
    rec = make(enabled=False, latent_inject_prob=1.0, context_inject_prob=1.0, noise_inject_prob=1.0,
               buffer_warmup_iter=100, gather=lambda t: calls.append(t) or t)
    shared, local = gens()
    before = shared.get_state()
    x0, noise = torch.randn(1, C, 2 * FPC, H, W), torch.randn(1, C, 2 * FPC, H, W)
    out = rec.corrupt(x0, noise, torch.tensor([[0, 50]]), positions(2), 0, shared, local)
    assert out.x0_in is x0 and out.noise_in is noise and out.context is x0 and not out.clean_step
    rec.store(x0, noise, torch.tensor([[0, 50]]), positions(2), 0, shared, local, clean_step=False)
    assert rec.worst_case_bytes() == 0 and rec.stats()["latent_entries"] == 0 and calls == []
    assert torch.equal(shared.get_state(), before)


def test_enabled_recycler_stores_both_buffers():
    rec = make()
    store(rec, [[1.0, 2.0]], [[0, 50]], noise_values=[[3.0, 4.0]])
    assert rec.entry_counts("latent") == {(0, 0): 1, (0, 2): 1}
    assert stored_values(rec, "latent", (0, 2)) == [2.0] and stored_values(rec, "noise", (0, 2)) == [4.0]


# ---------------------------------------------------------------- num_buckets / buffer_size_per_bucket


def test_num_buckets_maps_timestep_index_to_floor_of_width():
    rec = make()
    assert rec.buckets_of(torch.tensor([0, 24, 25, 49, 50, 99])).tolist() == [0, 0, 1, 1, 2, 3]
    # width 10/3 is not an integer: floor(i / (10/3))
    rec3 = make(num_buckets=3, timesteps=10)
    assert rec3.buckets_of(torch.tensor([0, 3, 4, 6, 7, 9])).tolist() == [0, 0, 1, 1, 2, 2]
    store(rec, [[1.0, 1.0, 1.0, 1.0]], [[24, 25, 75, 99]])
    assert rec.entry_counts("latent") == {(0, 0): 1, (0, 1): 1, (0, 3): 2}
    with pytest.raises(ValueError, match="timestep indices"):
        rec.buckets_of(torch.tensor([100]))


def test_num_buckets_above_timesteps_is_refused():
    with pytest.raises(ConfigError, match="training.error_recycling.num_buckets"):
        make(num_buckets=11, timesteps=10)


def test_buffer_size_per_bucket_caps_each_bucket():
    rec = make(buffer_size_per_bucket=3)
    for v in range(5):
        store(rec, [[float(v)]], [[0]])
    assert rec.entry_counts("latent") == {(0, 0): 3} and rec.entry_counts("noise") == {(0, 0): 3}
    stats = rec.stats()
    assert (stats["added"], stats["replaced"]) == (6, 4)  # both buffers
    assert stats["host_bytes"] == 6 * C * FPC * H * W * 2


# ---------------------------------------------------------------- buffer_warmup_iter


def test_warmup_gathers_on_every_store_and_multiplies_entries():
    calls = []

    def gather(t):  # a world of 3 ranks that all hold the same chunks
        calls.append((tuple(t.shape), t.dtype))
        return torch.cat([t, t, t])

    rec = make(buffer_warmup_iter=2, buffer_size_per_bucket=100, gather=gather)
    for step in range(3):
        store(rec, [[1.0, 2.0]], [[0, 30]], step=step)
        assert len(calls) == 2 * (step + 1)
    assert calls[0] == ((2, 2, C, FPC, H, W), torch.bfloat16) and calls[1] == ((2, 3), torch.int64)
    assert rec.entry_counts("latent") == {(0, 0): 9, (0, 1): 9}
    store(rec, [[1.0, 2.0]], [[0, 30]], step=3)  # past warm-up: local only
    assert len(calls) == 6 and rec.entry_counts("latent") == {(0, 0): 10, (0, 1): 10}


def test_warmup_gather_runs_even_when_this_rank_adds_nothing():
    calls = []
    rec = make(buffer_warmup_iter=5, gather=lambda t: calls.append(1) or torch.cat([t, t]),
               clean_buffer_update_prob=0.0)
    store(rec, [[1.0]], [[0]], step=1, clean_step=True)
    assert len(calls) == 2 and rec.entry_counts("latent") == {}
    assert rec.stats()["skipped_clean_updates"] == 1


def test_without_gather_warmup_stores_locally():
    rec = make(buffer_warmup_iter=5, gather=None)
    store(rec, [[1.0]], [[0]], step=0)
    assert rec.entry_counts("latent") == {(0, 0): 1}


# ---------------------------------------------------------------- injection probabilities


def filled(values_by_bucket, *, noise_by_bucket=None, **overrides):
    rec = make(buffer_size_per_bucket=64, **overrides)
    for bucket, value in values_by_bucket.items():
        noise_value = (noise_by_bucket or {}).get(bucket, value)
        store(rec, [[value]], [[bucket * 25]], noise_values=[[noise_value]])
    return rec


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_context_inject_prob(prob):
    rec = filled({0: 5.0}, context_inject_prob=prob)
    base = torch.full((1, C, 3 * FPC, H, W), 2.0)
    out = corrupt(rec, [[99, 99, 99]], context=base)  # bucket 3 is empty: context ignores the timestep
    assert chunk_values(out.context, 3).tolist() == ([[7.0, 7.0, 7.0]] if prob else [[2.0, 2.0, 2.0]])
    assert out.context_injected == (3 if prob else 0)
    assert torch.equal(out.x0_in, torch.zeros_like(out.x0_in)) and torch.equal(out.noise_in, out.x0_in)


def test_context_injection_draws_from_all_buckets():
    rec = filled({0: 1.0, 2: 2.0}, context_inject_prob=1.0)
    out = corrupt(rec, [[0] * 4] * 8)
    values = chunk_values(out.context, 4)
    assert set(values.unique().tolist()) == {1.0, 2.0}


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_latent_inject_prob_uses_bucket_of_each_chunk(prob):
    rec = filled({0: 1.0, 1: 2.0}, latent_inject_prob=prob)
    out = corrupt(rec, [[0, 30, 60, 99]])  # buckets 0, 1, 2 (empty), 3 (empty)
    expected = [[1.0, 2.0, 0.0, 0.0]] if prob else [[0.0] * 4]
    assert chunk_values(out.x0_in, 4).tolist() == expected
    assert out.latent_injected == (2 if prob else 0)
    assert torch.equal(out.context, torch.zeros_like(out.context)) and torch.equal(out.noise_in, out.context)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_noise_inject_prob_uses_noise_buffer(prob):
    rec = filled({0: 1.0, 1: 2.0}, noise_by_bucket={0: 7.0, 1: 8.0}, noise_inject_prob=prob)
    noise = chunked([[0.5, 0.5, 0.5]])
    out = corrupt(rec, [[0, 30, 60]], noise=noise)
    expected = [[7.5, 8.5, 0.5]] if prob else [[0.5, 0.5, 0.5]]
    assert chunk_values(out.noise_in, 3).tolist() == expected
    assert out.noise_injected == (2 if prob else 0)
    assert torch.equal(out.x0_in, torch.zeros_like(out.x0_in))


def test_injection_probability_is_a_per_step_decision():
    rec = filled({0: 1.0}, latent_inject_prob=0.5)
    shared, local = gens(3)
    injected = []
    for _ in range(400):
        out = corrupt(rec, [[0, 0]], g=(shared, local))
        injected.append(out.latent_injected)
    assert set(injected) == {0, 2}  # all chunks of a step or none
    assert 0.4 < injected.count(2) / 400 < 0.6


# ---------------------------------------------------------------- clean_prob / clean_buffer_update_prob


def test_clean_prob_one_skips_all_injections():
    rec = filled({0: 1.0}, clean_prob=1.0, context_inject_prob=1.0, latent_inject_prob=1.0, noise_inject_prob=1.0)
    out = corrupt(rec, [[0, 0]])
    assert out.clean_step and out.context_injected == out.latent_injected == out.noise_injected == 0
    assert torch.equal(out.x0_in, torch.zeros_like(out.x0_in))
    rec0 = filled({0: 1.0}, clean_prob=0.0, context_inject_prob=1.0, latent_inject_prob=1.0, noise_inject_prob=1.0)
    out0 = corrupt(rec0, [[0, 0]])
    assert not out0.clean_step and out0.context_injected == out0.latent_injected == out0.noise_injected == 2


def test_clean_prob_frequency():
    rec = filled({0: 1.0}, clean_prob=0.25)
    shared, local = gens(4)
    clean = sum(corrupt(rec, [[0]], g=(shared, local)).clean_step for _ in range(400))
    assert 0.18 < clean / 400 < 0.32


@pytest.mark.parametrize("update_prob, expected", [(0.0, 0), (1.0, 1)])
def test_clean_buffer_update_prob(update_prob, expected):
    rec = make(clean_buffer_update_prob=update_prob)
    store(rec, [[1.0]], [[0]], clean_step=True)
    assert sum(rec.entry_counts("latent").values()) == expected
    store(rec, [[1.0]], [[0]], clean_step=False)  # steps with injections always update
    assert sum(rec.entry_counts("latent").values()) == expected + 1


# ---------------------------------------------------------------- modulate_factor / start_step


def test_modulate_factor_scales_each_error_uniformly():
    rec = filled({0: 1.0}, latent_inject_prob=1.0, modulate_factor=0.3)
    values = chunk_values(corrupt(rec, [[0] * 4] * 16).x0_in, 4).flatten()
    assert values.min() >= 0.7 and values.max() <= 1.3
    assert values.min() < 0.8 and values.max() > 1.2 and len(values.unique()) == 64
    exact = filled({0: 1.0}, latent_inject_prob=1.0, modulate_factor=0.0)
    assert torch.equal(chunk_values(corrupt(exact, [[0] * 4] * 4).x0_in, 4), torch.ones(4, 4))


def test_start_step_gates_injection_but_not_storage():
    rec = filled({0: 1.0}, latent_inject_prob=1.0, clean_prob=1.0, start_step=5)
    early = corrupt(rec, [[0]], step=4)
    assert early.latent_injected == 0 and not early.clean_step  # no clean decision before start_step
    store(rec, [[2.0]], [[0]], step=4, clean_step=early.clean_step)
    assert rec.entry_counts("latent") == {(0, 0): 2}
    rec.cfg.clean_prob = 0.0
    assert corrupt(rec, [[0]], step=5).latent_injected == 1


# ---------------------------------------------------------------- replacement_strategy


def test_replacement_fifo_drops_oldest():
    rec = make(buffer_size_per_bucket=2, replacement_strategy="fifo")
    for v in (1.0, 2.0, 3.0):
        store(rec, [[v]], [[0]])
    assert stored_values(rec, "latent", (0, 0)) == [2.0, 3.0]


def test_replacement_random_replaces_a_random_slot():
    outcomes = set()
    for seed in range(20):
        rec = make(buffer_size_per_bucket=2, replacement_strategy="random")
        g = gens(seed)
        for v in (1.0, 2.0, 3.0):
            store(rec, [[v]], [[0]], g=g)
        kept = stored_values(rec, "latent", (0, 0))
        assert 3.0 in kept and len(kept) == 2
        outcomes.add(tuple(sorted(kept)))
    assert outcomes == {(1.0, 3.0), (2.0, 3.0)}


def test_replacement_l2_replaces_most_similar_entry():
    rec = make(buffer_size_per_bucket=2, replacement_strategy="l2")
    for v in (0.0, 10.0, 9.0):
        store(rec, [[v]], [[0]])
    assert sorted(stored_values(rec, "latent", (0, 0))) == [0.0, 9.0]
    store(rec, [[1.0]], [[0]])
    assert sorted(stored_values(rec, "latent", (0, 0))) == [1.0, 9.0]


# ---------------------------------------------------------------- enable_position_bucketing


def test_position_bucketing_keys_by_chunk_position():
    rec = make(enable_position_bucketing=True, latent_inject_prob=1.0, buffer_size_per_bucket=4)
    store(rec, [[10.0, 20.0, 30.0, 40.0]], [[0, 0, 0, 0]])
    store(rec, [[11.0, 21.0, 31.0, 41.0]], [[30, 30, 30, 30]])
    assert set(rec.entry_counts("latent")) == {(p, b) for p in range(4) for b in (0, 1)}
    out = corrupt(rec, [[30, 30, 30, 30]])
    assert chunk_values(out.x0_in, 4).tolist() == [[11.0, 21.0, 31.0, 41.0]]
    rec.cfg.latent_inject_prob, rec.cfg.context_inject_prob = 0.0, 1.0
    ctx = chunk_values(corrupt(rec, [[99] * 4] * 16).context, 4)  # any bucket, same position
    for j in range(4):
        assert set(ctx[:, j].tolist()) == {10.0 * (j + 1), 10.0 * (j + 1) + 1}
    assert rec.worst_case_bytes() == 4 * 4 * 4 * (C * FPC * H * W * 2) * 2


def test_position_bucketing_under_sp_uses_local_positions():
    rec = make(enable_position_bucketing=True, n_total=4, sp_rank=1, sp_size=2, latent_inject_prob=1.0)
    assert (rec.num_positions, rec.global_block_offset) == (2, 2)
    store(rec, [[5.0, 6.0]], [[30, 30]], pos=positions(2, start=2))
    assert rec.entry_counts("latent") == {(0, 1): 1, (1, 1): 1}
    assert chunk_values(corrupt(rec, [[30, 30]], pos=positions(2, start=2)).x0_in, 2).tolist() == [[5.0, 6.0]]
    with pytest.raises(ValueError, match="not one of SP rank 1"):
        store(rec, [[5.0, 6.0]], [[30, 30]], pos=positions(2))


def test_position_bucketing_refuses_gather_outside_the_dp_group():
    def world_gather(t):  # wrongly includes SP rank 0's chunks (positions 0, 1)
        if t.dtype == torch.int64:
            other = t.clone()
            other[:, 0] -= 2
            return torch.cat([t, other])
        return torch.cat([t, t])

    rec = make(enable_position_bucketing=True, sp_rank=1, sp_size=2, buffer_warmup_iter=5, gather=world_gather)
    with pytest.raises(RuntimeError, match="data-parallel group"):
        store(rec, [[5.0, 6.0]], [[30, 30]], pos=positions(2, start=2), step=0)


def test_position_bucketing_needs_chunks_divisible_by_sp():
    with pytest.raises(ConfigError, match="training.error_recycling.enable_position_bucketing"):
        make(enable_position_bucketing=True, n_total=3, sp_size=2)


# ---------------------------------------------------------------- skip_block_0


def test_skip_block_0_leaves_global_chunk_0_untouched():
    probs = dict(context_inject_prob=1.0, latent_inject_prob=1.0, noise_inject_prob=1.0)
    rec = filled({0: 5.0}, noise_by_bucket={0: 7.0}, skip_block_0=True, **probs)
    out = corrupt(rec, [[0, 0]])
    assert chunk_values(out.x0_in, 2).tolist() == [[0.0, 5.0]]
    assert chunk_values(out.context, 2).tolist() == [[0.0, 5.0]]
    assert chunk_values(out.noise_in, 2).tolist() == [[0.0, 7.0]]
    plain = filled({0: 5.0}, skip_block_0=False, **probs)
    assert chunk_values(corrupt(plain, [[0, 0]]).x0_in, 2).tolist() == [[5.0, 5.0]]
    # on SP rank 1 the first local chunk is global chunk 2: injected
    sp = make(sp_rank=1, sp_size=2, skip_block_0=True, **probs)
    store(sp, [[5.0, 5.0]], [[30, 30]], pos=positions(2, start=2))
    assert chunk_values(corrupt(sp, [[30, 30]], pos=positions(2, start=2)).x0_in, 2).tolist() == [[5.0, 5.0]]


# ---------------------------------------------------------------- host_memory_budget_gib


def test_reference_default_buffers_are_refused_at_5b_geometry():
    cfg = ErrorRecyclingConfig(enabled=True)  # 50 buckets x 500 entries, 32 GiB budget
    with pytest.raises(ConfigError) as err:
        ErrorRecycler(cfg, chunk_shape=(48, 44, 80), num_chunks_total=12)
    message = str(err.value)
    for needle in ("training.error_recycling.buffer_size_per_bucket", "training.error_recycling.host_memory_budget_gib",
                   "125.9 GiB", "at most 127"):
        assert needle in message
    ok = ErrorRecycler(ErrorRecyclingConfig(enabled=True, buffer_size_per_bucket=127), chunk_shape=(48, 44, 80),
                       num_chunks_total=12)
    assert ok.entry_bytes == 48 * 8 * 44 * 80 * 2 and ok.worst_case_bytes() == 50 * 127 * ok.entry_bytes * 2
    # SP shards buckets: rank 0 of 4 owns buckets 0, 4, ..., 48 (13 of 50)
    with pytest.raises(ConfigError):  # 13 x 500 x 2.7 MB x 2 is still ~32.7 GiB
        ErrorRecycler(cfg, chunk_shape=(48, 44, 80), num_chunks_total=12, sp_rank=0, sp_size=4)
    sp = ErrorRecycler(cfg, chunk_shape=(48, 44, 80), num_chunks_total=12, sp_rank=2, sp_size=4)  # owns 12
    assert sp.worst_case_bytes() == 12 * 500 * sp.entry_bytes * 2


def test_budget_counts_positions_when_position_bucketing():
    entry = C * FPC * H * W * 2
    budget = 4 * 8 * entry * 2 / 2**30  # exactly one position's worth
    assert make(host_memory_budget_gib=budget).worst_case_bytes() == 4 * 8 * entry * 2
    with pytest.raises(ConfigError, match="x 4 positions"):
        make(host_memory_budget_gib=budget, enable_position_bucketing=True)


# ---------------------------------------------------------------- SP bucket ownership


def test_sp_rank_owns_buckets_modulo_sp_and_remaps_to_nearest():
    rec = make(sp_rank=1, sp_size=2, latent_inject_prob=1.0)
    assert rec.owned_buckets == [1, 3]
    store(rec, [[1.0, 1.0, 3.0, 3.0]], [[0, 30, 60, 90]])  # buckets 0, 1, 2, 3
    assert rec.entry_counts("latent") == {(0, 1): 1, (0, 3): 1}
    assert rec.stats()["ignored_not_owned"] == 2
    out = corrupt(rec, [[0, 30, 60, 90]])
    assert chunk_values(out.x0_in, 4).tolist() == [[1.0, 1.0, 1.0, 3.0]]  # 0 -> 1, 2 -> 1 (tie: lower), 3 -> 3
    big = make(sp_rank=3, sp_size=4, num_buckets=50, timesteps=1000)
    assert big.owned_buckets == list(range(3, 50, 4))
    with pytest.raises(ConfigError, match="training.error_recycling.num_buckets"):
        make(num_buckets=2, sp_rank=0, sp_size=4)


# ---------------------------------------------------------------- determinism


def run_steps(rec, shared, local):
    outs = []
    for step in range(12):
        t = torch.randint(0, T, (2, 3), generator=local)
        out = rec.corrupt(torch.zeros(2, C, 3 * FPC, H, W), torch.zeros(2, C, 3 * FPC, H, W), t, positions(3),
                          step, shared, local)
        outs.append((out.x0_in, out.noise_in, out.context, out.clean_step))
        err = torch.randn(2, C, 3 * FPC, H, W, generator=local)
        rec.store(err, -err, t, positions(3), step, shared, local, clean_step=out.clean_step)
    return outs


def test_same_generators_reproduce_every_decision():
    kw = dict(context_inject_prob=0.5, latent_inject_prob=0.5, noise_inject_prob=0.5, clean_prob=0.3,
              clean_buffer_update_prob=0.5, modulate_factor=0.3, buffer_size_per_bucket=2,
              replacement_strategy="random", n_total=3)
    a, b = run_steps(make(**kw), *gens(7)), run_steps(make(**kw), *gens(7))
    for xa, xb in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(xa[:3], xb[:3])) and xa[3] == xb[3]
    shared, _ = gens(7)
    c = run_steps(make(**kw), shared, torch.Generator().manual_seed(123))
    assert any(not torch.equal(xa[0], xc[0]) for xa, xc in zip(a, c))


def test_shared_generator_draws_do_not_depend_on_buffer_contents():
    """Ranks of one SP group hold different buffers; their shared generators must stay in step."""
    kw = dict(context_inject_prob=1.0, latent_inject_prob=1.0, noise_inject_prob=1.0)
    empty, full = make(**kw), filled({0: 1.0, 1: 1.0}, **kw)
    ga, gb = gens(5), gens(5)
    for rec, (shared, local) in ((empty, ga), (full, gb)):
        out = rec.corrupt(torch.zeros(1, C, FPC, H, W), torch.zeros(1, C, FPC, H, W), torch.tensor([[0]]),
                          positions(1), 3, shared, local)
        rec.store(torch.zeros(1, C, FPC, H, W), torch.zeros(1, C, FPC, H, W), torch.tensor([[0]]), positions(1),
                  3, shared, local, clean_step=out.clean_step)
    assert torch.equal(ga[0].get_state(), gb[0].get_state())
    assert not torch.equal(ga[1].get_state(), gb[1].get_state())  # local draws did differ


# ---------------------------------------------------------------- persistence


def saved(rec) -> dict:
    buf = io.BytesIO()
    torch.save(rec.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_through_weights_only_load():
    kw = dict(latent_inject_prob=1.0, context_inject_prob=1.0, modulate_factor=0.3, buffer_size_per_bucket=2,
              n_total=3)
    rec = make(**kw)
    run_steps(rec, *gens(1))
    state = saved(rec)
    restored = make(**kw)
    restored.load_state_dict(state)
    assert restored.entry_counts("latent") == rec.entry_counts("latent")
    assert restored.entry_counts("noise") == rec.entry_counts("noise")
    assert restored.stats() == rec.stats()
    oa, ob = corrupt(rec, [[10, 40, 80]], g=gens(2)), corrupt(restored, [[10, 40, 80]], g=gens(2))
    assert torch.equal(oa.x0_in, ob.x0_in) and torch.equal(oa.context, ob.context)


def test_state_dict_keeps_fifo_age_order():
    rec = make(buffer_size_per_bucket=2)
    for v in (1.0, 2.0):
        store(rec, [[v]], [[0]])
    restored = make(buffer_size_per_bucket=2)
    restored.load_state_dict(saved(rec))
    store(restored, [[3.0]], [[0]])
    assert stored_values(restored, "latent", (0, 0)) == [2.0, 3.0]


def test_load_refuses_mismatched_geometry_layout_and_offsets():
    rec = make(sp_rank=1, sp_size=2)
    store(rec, [[1.0]], [[30]], pos=positions(1, start=2))
    state = saved(rec)
    with pytest.raises(ValueError, match="sp_rank: saved 1, this run 0"):
        make(sp_rank=0, sp_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="entry_shape"):
        ErrorRecycler(make_cfg(), chunk_shape=(C, H, W + 1), num_chunks_total=4, frames_per_chunk=FPC,
                      num_train_timesteps=T, sp_rank=1, sp_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_buckets"):
        make(num_buckets=6, sp_rank=1, sp_size=2).load_state_dict(state)
    pos = make(enable_position_bucketing=True, n_total=4, sp_rank=1, sp_size=2)
    store(pos, [[1.0]], [[30]], pos=positions(1, start=2))
    with pytest.raises(ValueError, match="global_block_offset: saved 2, this run 3"):
        make(enable_position_bucketing=True, n_total=6, sp_rank=1, sp_size=2).load_state_dict(saved(pos))
    small = make(sp_rank=1, sp_size=2, buffer_size_per_bucket=1)
    store(rec, [[2.0]], [[30]], pos=positions(1, start=2))
    with pytest.raises(ValueError, match="buffer_size_per_bucket=1"):
        small.load_state_dict(saved(rec))
    with pytest.raises(ValueError, match="not an error-buffer state"):
        make().load_state_dict({"weights": torch.zeros(1)})


# ---------------------------------------------------------------- input checks


def test_bad_inputs_are_refused():
    rec = make()
    with pytest.raises(ValueError, match=r"t_index must be \[B, chunks\]"):
        corrupt(rec, [[0, 0]], pos=positions(3), x0=torch.zeros(1, C, 3 * FPC, H, W),
                noise=torch.zeros(1, C, 3 * FPC, H, W))
    with pytest.raises(ValueError, match="chunk position 4"):
        corrupt(rec, [[0]], pos=torch.tensor([4]))
    with pytest.raises(ValueError, match="timestep indices"):
        corrupt(rec, [[100]])
    with pytest.raises(ValueError, match="chunk_shape"):
        ErrorRecycler(make_cfg(), chunk_shape=(C, FPC, H, W), num_chunks_total=4)


# ---------------------------------------------------------------- real collectives (gloo, 2 processes)


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _worker(out_dir) -> None:
    """One rank: a DP scenario (ranks decide clean steps differently) and an SP scenario (bucket sharding)."""
    import os
    from datetime import timedelta
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    # DP: two replicas, shared generators seeded per DP group, so clean-step decisions differ
    rec = make(buffer_warmup_iter=4, clean_prob=0.5, clean_buffer_update_prob=0.0, buffer_size_per_bucket=100,
               gather=_all_gather)
    shared, local = gens(20 + rank)
    updates = []
    for step in range(8):
        out = corrupt(rec, [[0, 0]], step=step, g=(shared, local))
        store(rec, [[float(rank), float(rank)]], [[0, 0]], step=step, clean_step=out.clean_step, g=(shared, local))
        updates.append(not out.clean_step)
    results["dp"] = (updates, rec.entry_counts("latent"))
    # SP: one group of two ranks; rank r holds global chunk r in bucket 1 - r, owned by the other rank
    rec = make(n_total=2, sp_rank=rank, sp_size=2, buffer_warmup_iter=1, gather=_all_gather)
    shared, local = gens(30)
    for step in range(3):
        store(rec, [[float(rank)]], [[30 if rank == 0 else 0]], pos=positions(1, start=rank), step=step,
              g=(shared, local))
    results["sp"] = (rec.entry_counts("latent"), stored_values(rec, "latent", (0, rank)), rec.stats())
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_warmup_gather_never_deadlocks_and_fills_every_rank(tmp_path):
    import os
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    (u0, counts0), (u1, counts1) = res[0]["dp"], res[1]["dp"]
    assert u0 != u1  # the ranks took different clean-step decisions, yet every gather matched up
    for updates, counts in ((u0, counts0), (u1, counts1)):
        warm = sum(updates[:5])  # steps 0..4 gather 2 ranks x 2 chunks, later steps keep their own 2 chunks
        assert counts.get((0, 0), 0) == warm * 4 + sum(updates[5:]) * 2
    for rank in range(2):
        counts, values, stats = res[rank]["sp"]
        assert counts == {(0, rank): 2}  # the other rank's chunk, from the two warm-up steps only
        assert values == [float(1 - rank)] * 2
        assert stats["ignored_not_owned"] == 2 + 1  # own chunk in both warm-up steps, then locally


if __name__ == "__main__":
    _worker(sys.argv[1])


# ---------------------------------------------------------------- resume without recycling, device buffers


def test_run_without_recycling_resumes_its_own_state_but_refuses_real_buffers():
    off = make(enabled=False)
    again = make(enabled=False)
    again.load_state_dict(saved(off))  # a run with recycling off resumes from its own checkpoint
    assert again.entry_counts("latent") == {}
    on = make()
    store(on, [[1.0]], [[0]])
    with pytest.raises(ValueError, match="holds 2 error-buffer entries.*enabled is false"):
        make(enabled=False).load_state_dict(saved(on))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_buffers_make_the_same_decisions_as_host_buffers(device):  # cuda: skipped by conftest without a GPU
    kw = dict(latent_inject_prob=1.0, context_inject_prob=1.0, noise_inject_prob=1.0, modulate_factor=0.3,
              buffer_size_per_bucket=2, n_total=3)
    host = make(**kw)
    dev = ErrorRecycler(make_cfg(buffer_device="device", **{k: v for k, v in kw.items() if k != "n_total"}),
                        chunk_shape=(C, H, W), num_chunks_total=3, frames_per_chunk=FPC, num_train_timesteps=T,
                        device=device)
    assert dev.buffer_device.type == device and host.buffer_device.type == "cpu"
    for rec in (host, dev):
        run_steps(rec, *gens(1))
    assert {e.device.type for entries in dev._buffers["latent"].values() for e in entries} == {device}
    x0 = torch.randn(1, C, 3 * FPC, H, W)
    a = corrupt(host, [[10, 40, 80]], g=gens(2), x0=x0)
    b = corrupt(dev, [[10, 40, 80]], g=gens(2), x0=x0.to(device))
    assert torch.equal(a.x0_in, b.x0_in.cpu()) and torch.equal(a.context, b.context.cpu())
    state = saved(dev)  # saved on the host, whatever holds the buffers
    assert all(e.device.type == "cpu" for e in state["buffers"]["latent"]["entries"])
    host.load_state_dict(state)
    assert host.entry_counts("latent") == dev.entry_counts("latent")
