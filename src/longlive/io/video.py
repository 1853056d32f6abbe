"""MP4 video files: a chunk-by-chunk H.264 writer that survives being killed, and a training reader.

Library: PyAV. Its wheels ship FFmpeg with libx264 (checked: PyAV 18.1 lists `libx264`; no
`libopenh264`), give in-process access to encoder, muxer and decoder, and need no ffmpeg binary.
imageio-ffmpeg pipes raw frames to an ffmpeg subprocess: no muxer control, and its binary is one
more download. The writer encodes each appended chunk with one persistent libx264 encoder (zero
latency, forced IDR at each chunk start) and muxes the chunk as its own MP4 fragment (moof+mdat),
appended and flushed to the file at once: after `append` returns, the file on disk is a playable
fragmented MP4 holding every appended frame. A chunk may be appended in pieces (`end_fragment=False`
encodes without writing), so encoding starts before the chunk is complete. `close` remuxes the file
into a plain MP4 with the index at the front (faststart) for players that prefer one.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

H264_ENCODERS: tuple[str, ...] = ("libx264",)
# Each appended chunk is muxed by a fresh MP4 muxer into one fragment: `frag_discont` +
# `avoid_negative_ts=disabled` keep the chunk's real start time in `tfdt`, `fragment_index`
# keeps the fragment numbers running, `skip_trailer` leaves out the per-muxer `mfra`.
_FRAGMENT_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+frag_discont+skip_trailer"


class VideoFileError(RuntimeError):
    """A video file could not be read or written; the message names the file."""


def pick_h264_encoder(candidates: Sequence[str] = H264_ENCODERS) -> str:
    """Return the first H.264 encoder in `candidates` that this PyAV build bundles, or raise."""
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises several types for an unknown codec
            continue
    raise VideoFileError(
        f"no H.264 encoder among {list(candidates)} in this PyAV {av.__version__} build "
        f"(FFmpeg libavcodec {av.library_versions.get('libavcodec')}); install the PyPI `av` wheel, "
        "which bundles libx264"
    )


def _top_level_boxes(data: bytes) -> list[tuple[str, int, int]]:
    """Split MP4 bytes into top-level boxes `(type, start, end)`; raises on a truncated box."""
    boxes, pos = [], 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError(f"truncated MP4 box header at byte {pos}")
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        if size < 8 or pos + size > len(data):
            raise ValueError(f"bad MP4 box size {size} at byte {pos}")
        boxes.append((kind.decode("latin-1"), pos, pos + size))
        pos += size
    return boxes


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert `[T,3,H,W]`/`[T,H,W,3]` (or `[1,T,...]`) uint8 or float-in-[0,1] frames to uint8 THWC.

    Floats are clamped to [0,1], scaled by 255 and rounded; NaN/inf raise instead of being written.
    A shape with 3 in both dim 1 and dim -1 is read as `[T,3,H,W]`.
    """
    x = torch.as_tensor(frames).detach()
    if x.dim() == 5 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 4:
        raise ValueError(f"frames must be [T,3,H,W] or [T,H,W,3], got shape {tuple(x.shape)}")
    if x.shape[1] == 3:
        x = x.permute(0, 2, 3, 1)
    elif x.shape[-1] != 3:
        raise ValueError(f"frames need 3 colour channels in dim 1 or -1, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.contiguous().cpu().numpy()
    if not x.is_floating_point():
        raise TypeError(f"frames must be uint8 or floating point in [0,1], got {x.dtype}")
    x = x.float()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"frames contain {bad} NaN/inf value(s); refusing to write them")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous().cpu().numpy()


class Mp4Writer:
    """Append frames chunk by chunk to an H.264/yuv420p MP4 that stays playable after every append.

    Use as a context manager; `close` finishes the file (faststart remux by default). If the process
    dies between appends, the file on disk is a valid fragmented MP4 with all appended frames.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float = 24,
        crf: int = 18,
        preset: str = "medium",
        faststart: bool = True,
        fsync: bool = True,
    ) -> None:
        if not (isinstance(fps, (int, float, Fraction)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r} (for {path})")
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf, self.preset = int(crf), str(preset)
        self.faststart, self.fsync = faststart, fsync
        self.frames_written = 0
        self.remux_seconds = 0.0  # time `close` spent on the faststart remux
        self._fragments = 0
        self._size: tuple[int, int] | None = None
        self._encoder: Any = None
        self._packets: list[Any] = []  # encoded, not yet written (a fragment in progress)
        self._pending = 0  # frames in `_packets`
        self._file: io.BufferedWriter | None = None
        self._closed = False
        self._codec = pick_h264_encoder()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_encoder(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"{self.path}: yuv420p H.264 needs even height and width, got {height}x{width}; crop or pad the frames")
        ctx = av.CodecContext.create(self._codec, "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base, ctx.framerate = 1 / self.fps, self.fps
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # BT.709, tagged in the SPS
        ctx.color_range = 1  # limited ("MPEG") range, what browsers expect
        # zerolatency: no B-frames or lookahead, so every frame of a chunk leaves the encoder
        # during that chunk; forced-idr makes each chunk (fragment) start at a keyframe.
        ctx.options = {"preset": self.preset, "crf": str(self.crf), "tune": "zerolatency", "forced-idr": "1"}
        ctx.open()
        self._encoder, self._size = ctx, (height, width)
        self._file = open(self.path, "wb")
        logger.info("writing %s (%dx%d, %s fps, %s crf %d)", self.path, width, height, self.fps, self._codec, self.crf)

    def append(self, frames: torch.Tensor | np.ndarray, *, end_fragment: bool = True) -> None:
        """Encode `frames`; with `end_fragment` (the default) the frames encoded since the last fragment
        become one MP4 fragment, written to disk before this returns.

        `end_fragment=False` only encodes: a producer hands over a chunk in pieces as they are ready (the
        VAE decodes 4 frames at a time), so the encoder works while the rest is made, and the chunk still
        becomes one fragment starting at a keyframe. Encoded frames reach the file when a later append
        ends their fragment, or at `close`.
        """
        if self._closed:
            raise VideoFileError(f"{self.path}: append after close")
        try:
            rgb = frames_to_uint8(frames)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{self.path}: {exc}") from exc
        if rgb.shape[0] == 0 and not (end_fragment and self._packets):
            logger.warning("%s: append got 0 frames; nothing written", self.path)
            return
        if self._encoder is None:
            self._open_encoder(rgb.shape[1], rgb.shape[2])
        if rgb.shape[0] and tuple(rgb.shape[1:3]) != self._size:
            raise ValueError(f"{self.path}: frame size {rgb.shape[1:3]} differs from the first chunk's {self._size}")
        try:
            self._encode(rgb)
        except av.error.FFmpegError as exc:
            raise VideoFileError(f"{self.path}: encoding frames {self.frames_written + self._pending}..: {exc}") from exc
        if end_fragment:
            self._write_fragment()

    def _encode(self, rgb: np.ndarray) -> None:
        """Encode frames into `self._packets` (zero latency: one packet per frame, checked at the fragment's end)."""
        for image in rgb:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG"
            )
            frame.pts, frame.time_base = self.frames_written + self._pending, self._encoder.time_base
            if self._pending == 0:  # each fragment starts at a keyframe
                frame.pict_type = av.video.frame.PictureType.I
            self._packets.extend(self._encoder.encode(frame))
            self._pending += 1

    def _write_fragment(self) -> None:
        """Mux the encoded frames as one fragment, append it to the file, flush (and fsync)."""
        packets, frames = self._packets, self._pending
        self._packets, self._pending = [], 0
        if len(packets) != frames:
            raise VideoFileError(f"{self.path}: encoder returned {len(packets)} packets for {frames} frames (encoder delay)")
        buf = io.BytesIO()
        options = {
            "movflags": _FRAGMENT_MOVFLAGS,
            "fragment_index": str(self._fragments + 1),
            "avoid_negative_ts": "disabled",
        }
        try:
            with av.open(buf, "w", format="mp4", options=options) as out:
                stream = out.add_mux_stream("h264", rate=self.fps, width=self._size[1], height=self._size[0])
                stream.time_base = 1 / self.fps
                for packet in packets:
                    packet.stream, packet.duration = stream, 1
                    out.mux(packet)
        except av.error.FFmpegError as exc:
            raise VideoFileError(f"{self.path}: muxing frames {self.frames_written}..: {exc}") from exc
        data = buf.getvalue()
        keep = ("moof", "mdat") if self.frames_written else ("ftyp", "moov", "moof", "mdat")
        boxes = _top_level_boxes(data)
        dropped = [kind for kind, _, _ in boxes if kind not in keep]
        if dropped:
            logger.debug("%s: fragment muxer boxes not copied: %s", self.path, dropped)
        assert self._file is not None
        self._file.write(b"".join(data[s:e] for kind, s, e in boxes if kind in keep))
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._fragments += sum(kind == "moof" for kind, _, _ in boxes)
        self.frames_written += frames

    def close(self) -> None:
        """Finish the file; with `faststart`, remux the fragments into a plain MP4 (index first)."""
        if self._closed:
            return
        self._closed = True
        if self._file is None:
            logger.warning("%s: writer closed without frames; no file written", self.path)
            return
        try:
            if self._pending:  # a fragment in progress: its frames are written, not dropped
                self._write_fragment()
        finally:
            self._file.close()
        self._encoder = None
        if self.faststart:
            t0 = time.perf_counter()
            _remux_faststart(self.path)
            self.remux_seconds = time.perf_counter() - t0
        logger.info("wrote %s: %d frames at %s fps", self.path, self.frames_written, self.fps)


def _remux_faststart(path: Path) -> None:
    """Rewrite the fragmented MP4 at `path` as a plain MP4 with `moov` first (packets copied)."""
    tmp = path.with_name(f".{path.name}.faststart.tmp")
    try:
        with av.open(str(path)) as src, av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}) as dst:
            ist = src.streams.video[0]
            ost = dst.add_stream_from_template(ist)
            for packet in src.demux(ist):
                if packet.dts is None:
                    continue  # demuxer's end-of-stream marker
                packet.stream = ost
                dst.mux(packet)
        os.replace(tmp, path)
    except av.error.FFmpegError as exc:
        tmp.unlink(missing_ok=True)
        raise VideoFileError(f"faststart remux of {path} failed ({exc}); the fragmented MP4 there is complete and playable") from exc


def save_video(
    video: torch.Tensor | np.ndarray, path: str | os.PathLike[str], fps: float = 24, **writer_kwargs: Any
) -> None:
    """Write a whole video (`[T,3,H,W]`, `[1,T,3,H,W]` or THWC; uint8 or float [0,1]) to `path`."""
    with Mp4Writer(path, fps=fps, **writer_kwargs) as writer:
        writer.append(video)


@dataclass(frozen=True)
class VideoInfo:
    """Frame count, frame rate and size of a video file's first video stream."""

    path: Path
    num_frames: int
    fps: float
    height: int
    width: int


def _open_input(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise VideoFileError(f"could not open video {path}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoFileError(f"{path} has no video stream")
    return container


def _stream_fps(stream: Any, path: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        raise VideoFileError(f"{path}: the video stream has no frame rate")
    return float(rate)


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read frame count (counting packets if the header has none), fps and size without decoding."""
    path = Path(path)
    with _open_input(path) as container:
        stream = container.streams.video[0]
        try:
            count = stream.frames or sum(1 for p in container.demux(stream) if p.size > 0)
        except av.error.FFmpegError as exc:
            raise VideoFileError(f"could not read packets of {path}: {exc}") from exc
        return VideoInfo(path, int(count), _stream_fps(stream, path), stream.height, stream.width)


def resample_indices(
    num_source: int, orig_fps: float, target_fps: float, start: int = 0, count: int | None = None
) -> list[int]:
    """Source frame indices for `target_fps`: `start + round(i * orig_fps / target_fps)` (spec 5.6).

    Uses Python's round (half to even). Stops at the end of the source or after `count` frames.
    """
    if orig_fps <= 0 or target_fps <= 0:
        raise ValueError(f"fps must be positive, got orig {orig_fps}, target {target_fps}")
    step = orig_fps / target_fps
    out: list[int] = []
    while count is None or len(out) < count:
        idx = start + round(len(out) * step)
        if idx >= num_source:
            break
        out.append(idx)
    return out


def read_video(
    path: str | os.PathLike[str],
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    start_frame: int = 0,
    num_frames: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode a video to `[3, T, H, W]` in [-1, 1] for training.

    Frames are resampled to `fps` from source frame `start_frame` (spec 5.6 index stepping), resized
    to `size` = (H, W) with antialiased bilinear filtering (aspect not kept), and normalised by
    (x/255 - 0.5)/0.5. Asking for more frames than the file has raises.
    """
    path = Path(path)
    info = probe_video(path)
    src_fps = info.fps
    wanted = resample_indices(info.num_frames, src_fps, fps or src_fps, start_frame, num_frames)
    with _open_input(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        positions: dict[int, list[int]] = {}
        for out_i, src_i in enumerate(wanted):
            positions.setdefault(src_i, []).append(out_i)
        last = max(positions) if positions else -1
        frames: list[torch.Tensor | None] = [None] * len(wanted)
        decoded = 0
        try:
            for frame in container.decode(stream):
                if decoded in positions:
                    image = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                    for out_i in positions[decoded]:
                        frames[out_i] = image
                decoded += 1
                if decoded > last:
                    break
        except av.error.FFmpegError as exc:
            raise VideoFileError(f"decoding {path} failed at frame {decoded}: {exc}") from exc
    got = [f for f in frames if f is not None]
    needed = num_frames if num_frames is not None else max(len(wanted), 1)
    if len(got) < needed:
        raise VideoFileError(
            f"{path}: {info.num_frames} source frame(s) ({decoded} decoded) at {src_fps:.3f} fps give "
            f"{len(got)} frame(s) from source frame {start_frame} at {fps or src_fps} fps; {needed} needed"
        )
    video = torch.stack(got).permute(0, 3, 1, 2)  # [T, 3, H, W] uint8
    out = torch.empty(video.shape[0], 3, *(size or video.shape[2:]), dtype=dtype)
    for s in range(0, video.shape[0], 16):  # bounded float memory for long clips
        part = video[s : s + 16].float()
        if size is not None and tuple(size) != tuple(part.shape[2:]):
            part = F.interpolate(part, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        out[s : s + 16] = ((part / 255.0 - 0.5) / 0.5).clamp(-1, 1).to(dtype)
    return out.permute(1, 0, 2, 3)
