"""Distributed chunk-halo VAE encoding for sequence-parallel training (spec 5.3, 9.2 item 19).

Only the source rank of a sequence-parallel (SP) group holds the decoded raw video. It sends each
other rank exactly that rank's raw halo window (point-to-point, never the whole clip), and every
rank encodes only its own window, keeping `latent_frames / sp` latents. Batch metadata (prompts,
valid-frame counts) travels with `broadcast_object`. The window arithmetic lives in
`longlive.models.vae.halo`; this module only moves frames between ranks.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from longlive.models.vae.halo import HaloWindow, encode_halo_window, sp_halo_windows
from longlive.models.vae.model import WanVAE

logger = logging.getLogger(__name__)

# Dtypes a raw window may have on the wire; the header carries the index into this tuple.
WIRE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
)

# Header sent before every window: [status, dtype code, B, C, H, W, raw_start, raw_end] (int64).
HEADER_LEN = 8
_OK = 0
# Status codes a source rank sends instead of a window when it rejects the batch, so that the
# receiving ranks raise too instead of waiting forever in recv.
_SOURCE_ERRORS = {
    1: "the source rank has no frames (frames=None)",
    2: "the source rank's frames are not a 5-D video [B, 3, T, H, W]",
    3: "the source rank's frame count T does not match latent_frames (T must be 4(F-1)+1)",
    4: "the source rank's frames have a dtype that cannot be sent",
}


def _sp_size(group: dist.ProcessGroup | None) -> int:
    """Size of the SP group; group None means no sequence parallelism (size 1)."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def _group_rank(group: dist.ProcessGroup, where: str) -> int:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"{where}: global rank {dist.get_rank()} is not a member of the given process group; "
            "call it only on the ranks of that sequence-parallel group."
        )
    return rank


def _check_src(src: int, sp: int, where: str) -> None:
    if not 0 <= src < sp:
        raise ValueError(f"{where}: src must be a group rank in [0, {sp}), got {src}.")


def comm_device(group: dist.ProcessGroup) -> torch.device:
    """Device that `group`'s backend sends from: the current CUDA device for NCCL, else CPU (gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _expected_raw_frames(latent_frames: int, stride: int) -> int:
    return 1 + stride * (latent_frames - 1)


def _frame_problem(
    frames: torch.Tensor | None, latent_frames: int, stride: int, *, to_send: bool
) -> tuple[int, str] | None:
    """(status code, message) if `frames` cannot be encoded (and, if `to_send`, sent), else None."""
    if frames is None:
        return 1, "encode_sharded: the source rank must pass the raw video `frames` [B, 3, T, H, W]; got None."
    if frames.dim() != 5:
        return 2, (
            f"encode_sharded: frames must be a video [B, 3, T, H, W]; got shape {tuple(frames.shape)}."
        )
    expected = _expected_raw_frames(latent_frames, stride)
    if frames.shape[2] != expected:
        got = frames.shape[2]
        fix = (
            f"pass latent_frames={(got - 1) // stride + 1}"
            if (got - 1) % stride == 0
            else f"trim or pad the clip to {expected} frames"
        )
        return 3, (
            f"encode_sharded: latent_frames={latent_frames} needs T = {stride}(F-1)+1 = {expected} raw frames, "
            f"but frames has T={got} (shape {tuple(frames.shape)}); {fix}."
        )
    if to_send and frames.dtype not in WIRE_DTYPES:
        return 4, (
            f"encode_sharded: frames dtype {frames.dtype} cannot be sent; "
            f"convert it to one of {', '.join(str(d) for d in WIRE_DTYPES)}."
        )
    return None


def _check_divisible(latent_frames: int, sp: int) -> None:
    if latent_frames < 1 or latent_frames % sp:
        raise ValueError(
            f"encode_sharded: latent_frames ({latent_frames}) must be a positive multiple of the "
            f"sequence-parallel size ({sp}); change the clip's latent frame count (data.image_or_video_shape[1]) "
            f"or infra.sequence_parallel_size so that every SP rank keeps the same number of latents."
        )


def _check_kept(kept: torch.Tensor, vae: WanVAE, batch: int, height: int, width: int, frames: int) -> torch.Tensor:
    cfg = vae.config
    s = cfg.spatial_stride
    expected = (batch, cfg.z_dim, frames, height // s, width // s)
    if tuple(kept.shape) != expected:
        raise RuntimeError(
            f"encode_sharded: encoded latents have shape {tuple(kept.shape)}, expected {expected} "
            f"([B, z_dim, latent_frames/sp, H/{s}, W/{s}])."
        )
    return kept


def encode_sharded(
    vae: WanVAE,
    frames: torch.Tensor | None,
    *,
    latent_frames: int,
    halo_latents: int,
    group: dist.ProcessGroup | None = None,
    src: int = 0,
) -> torch.Tensor:
    """Encode this rank's share of a clip with the chunk-halo scheme; call on every rank of `group`.

    Group rank `src` passes the raw video [B, 3, T, H, W] (T = 4(F-1)+1), the others pass None; it
    sends each rank only its raw window. Returns the kept latents [B, z, F/sp, H/16, W/16].
    With group None (or a group of one rank) the whole clip is encoded locally.
    """
    stride = vae.config.temporal_stride
    sp = _sp_size(group)
    if sp == 1:
        problem = _frame_problem(frames, latent_frames, stride, to_send=False)
        if problem is not None:
            raise ValueError(problem[1])
        assert frames is not None
        latents = vae.encode(frames)
        b, _, _, h, w = frames.shape
        return _check_kept(latents, vae, b, h, w, latent_frames)

    assert group is not None
    _check_src(src, sp, "encode_sharded")
    _check_divisible(latent_frames, sp)
    rank = _group_rank(group, "encode_sharded")
    windows = sp_halo_windows(
        latent_frames, sp, halo_latents, _expected_raw_frames(latent_frames, stride), stride
    )
    device = comm_device(group)
    if rank == src:
        window = windows[rank]
        own = _send_windows(frames, windows, latent_frames, stride, group, src, device)
    else:
        if frames is not None:
            logger.warning(
                "encode_sharded: group rank %d is not the source (group rank %d) and ignores the frames it was "
                "given; pass frames=None there and skip decoding the video on non-source ranks.",
                rank, src,
            )
        window = windows[rank]
        own = _recv_window(window, group, src, device)
    kept = encode_halo_window(vae, own, window)
    b, _, _, h, w = own.shape
    return _check_kept(kept, vae, b, h, w, latent_frames // sp)


def _send_windows(
    frames: torch.Tensor | None,
    windows: list[HaloWindow],
    latent_frames: int,
    stride: int,
    group: dist.ProcessGroup,
    src: int,
    device: torch.device,
) -> torch.Tensor:
    """On the source: send every other rank its header and raw window; return the source's own window."""
    peers = [r for r in range(len(windows)) if r != src]
    problem = _frame_problem(frames, latent_frames, stride, to_send=True)
    if problem is not None:
        code, message = problem
        shape = tuple(frames.shape) if frames is not None and frames.dim() == 5 else (-1,) * 5
        header = torch.tensor([code, -1, shape[0], shape[1], shape[3], shape[4], -1, shape[2]], dtype=torch.int64)
        for r in peers:
            dist.send(header.to(device), dst=dist.get_global_rank(group, r), group=group)
        raise ValueError(message)
    assert frames is not None
    b, c, _, h, w = frames.shape
    code = WIRE_DTYPES.index(frames.dtype)
    for r in peers:
        win = windows[r]
        dst = dist.get_global_rank(group, r)
        header = torch.tensor([_OK, code, b, c, h, w, win.raw_start, win.raw_end], dtype=torch.int64)
        dist.send(header.to(device), dst=dst, group=group)
        # One window copy alive at a time: the source never materialises the clip once per rank.
        payload = frames[:, :, win.raw_start : win.raw_end].to(device).contiguous()
        dist.send(payload, dst=dst, group=group)
        del payload
    win = windows[src]
    return frames[:, :, win.raw_start : win.raw_end]


def _recv_window(window: HaloWindow, group: dist.ProcessGroup, src: int, device: torch.device) -> torch.Tensor:
    """On a non-source rank: receive the header, then the raw window it describes."""
    src_global = dist.get_global_rank(group, src)
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    dist.recv(header, src=src_global, group=group)
    status, code, b, c, h, w, raw_start, raw_end = (int(v) for v in header.cpu())
    if status != _OK:
        reason = _SOURCE_ERRORS.get(status, f"unknown status {status}")
        detail = f" (the source's frames have T={raw_end})" if status == 3 else ""
        raise RuntimeError(
            f"encode_sharded: the source rank (group rank {src}, global rank {src_global}) rejected the batch: "
            f"{reason}{detail}; see the source rank's error."
        )
    if (raw_start, raw_end) != (window.raw_start, window.raw_end):
        raise RuntimeError(
            f"encode_sharded: the source sent raw frames [{raw_start}, {raw_end}) but this rank expects "
            f"[{window.raw_start}, {window.raw_end}); pass the same latent_frames and halo_latents on every rank."
        )
    if not 0 <= code < len(WIRE_DTYPES):
        raise RuntimeError(f"encode_sharded: the source sent an unknown dtype code {code}.")
    payload = torch.empty((b, c, raw_end - raw_start, h, w), dtype=WIRE_DTYPES[code], device=device)
    dist.recv(payload, src=src_global, group=group)
    return payload


def broadcast_object(obj: Any, group: dist.ProcessGroup | None = None, src: int = 0) -> Any:
    """Return group rank `src`'s `obj` on every rank of `group` (batch metadata: prompts, valid counts).

    Uses `broadcast_object_list` (pickle; trusted in-job data only). Works with gloo and NCCL.
    With group None (or a group of one rank) `obj` is returned unchanged.
    """
    sp = _sp_size(group)
    if sp == 1:
        return obj
    assert group is not None
    _check_src(src, sp, "broadcast_object")
    rank = _group_rank(group, "broadcast_object")
    box = [obj if rank == src else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group, device=comm_device(group))
    return box[0]
