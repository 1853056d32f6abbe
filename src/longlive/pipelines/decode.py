"""VAE decode modes of long-video inference: latent chunks in, uint8 frames handed to a sink.

`inference.streaming_vae` off decodes the whole video at the end (`decode_batch`). With it on, each
latent chunk the DiT finishes goes to a `ChunkDecoder` (`submit`), which decodes it with one
stateful `StreamingDecoder` and hands the frames, on the CPU, to a sink (an `Mp4Writer`, usually behind a `BackgroundWriter` thread).
The "sync", "rows" and "device" modes hand a chunk over in pieces, the 4 frames of each latent frame as
they are decoded (`append(piece, end_fragment=False)`, the last piece ending the chunk), so the encoder
works on a chunk while the VAE still decodes it; only the last piece's encode is left when the last
chunk is decoded.

- ``"sync"``: decode on the calling thread; every frame is handed to the sink before `submit` returns.
- ``"stream"`` (`inference.async_vae`, CUDA only): the decode runs on a second CUDA stream of the DiT's
  device, overlapping the DiT's next chunk. At most one decode is in flight: `submit(k+1)` first
  waits for chunk k's frames to reach pinned host memory and hands them to the sink. The frames are
  copied off the GPU right after their decode, so GPU memory does not grow with the video.
- ``"device"`` (`inference.vae_device`): the VAE lives on its own device (``cuda:1``, or ``cpu``);
  a background thread decodes chunks from a bounded queue (2 chunks, so a slow VAE blocks the
  producer instead of piling latents up) and alone calls the sink. Worker errors surface in the
  calling thread at the next `submit` or at `finish` as a RuntimeError naming the chunk.

All modes (and the batch path) convert pixels the same way, `frames_to_host`, so their frames are
bit-identical to `frames_to_host(vae.decode(all_latents))`. Only batch size 1 (one video) is
supported; other batch sizes raise ValueError.

Usage (what `InferencePipeline.generate` does)::

    decoder = make_chunk_decoder(vae, writer, decode_mode(inf.streaming_vae, inf.async_vae, inf.vae_device))
    try:
        ... on_chunk=lambda k, x: decoder.submit(k, x) ...
        decoder.finish()
    finally:
        decoder.close()
        writer.close()
"""
from __future__ import annotations

import abc
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

DECODE_MODES: tuple[str, ...] = ("batch", "sync", "stream", "device", "rows")
CHUNK_MODES: tuple[str, ...] = ("sync", "stream", "device", "rows")


class ChunkDecodeSink(Protocol):
    """Receives decoded frames in order; `Mp4Writer` satisfies it."""

    def append(self, frames: torch.Tensor, end_fragment: bool = True) -> None:
        """`frames`: [T, H, W, 3] uint8 on the CPU (may be pinned memory). The chunk decoders hand a chunk
        over in pieces as they are decoded; `end_fragment` marks a chunk's last piece."""
        ...


# ------------------------------------------------------------------------------------------ helpers
_STOP = object()  # end-of-stream marker of the worker queues

def _check_batch(tensor: torch.Tensor, what: str) -> None:
    if tensor.dim() != 5:
        raise ValueError(f"{what} must be 5-D [B, C, T, H, W]; got shape {tuple(tensor.shape)}")
    if tensor.shape[0] != 1:
        raise ValueError(f"{what}: the decode modes handle one video (batch size 1); got batch size {tensor.shape[0]}")


def _frames_on_device(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 3, T, H, W] pixels in [-1, 1] -> (contiguous [T, H, W, 3] uint8, count of non-finite pixels), on
    the video's device. Converting on the device moves 4x fewer bytes to the host than float32 frames
    (86 MB instead of 346 MB per 704x1280 chunk) and leaves the CPU free for the encoder."""
    _check_batch(video, "decoded video")
    x = video[0].permute(1, 2, 3, 0).float()
    bad = (~torch.isfinite(x)).sum()
    frames = x.add(1).mul(0.5).clamp(0, 1).mul(255).round().to(torch.uint8).contiguous()
    return frames, bad


def _check_finite(bad: torch.Tensor | int, where: str) -> None:
    n = int(bad)
    if n:
        raise ValueError(f"{where}: the VAE produced {n} NaN/inf pixel value(s); refusing to write them")


def frames_to_host(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [1, 3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 on the CPU.

    Exactly `frames_to_uint8` of `video[0].permute(1, 0, 2, 3).float().add(1).mul(0.5).clamp(0, 1)`
    (what the MP4 writer would compute), done on the video's device with elementwise, exactly rounded
    float32 operations, so the device does not change the values. Non-finite pixels raise.
    """
    frames, bad = _frames_on_device(video)
    if frames.device.type != "cuda":
        _check_finite(bad, "decode")
        return frames.cpu()
    # into page-locked memory: a pageable copy of a 704x1280 chunk (86 MB) ran at about 1.4 GB/s
    host = _pinned_like(frames)
    host.copy_(frames, non_blocking=True)
    _check_finite(bad.cpu(), "decode")  # waits for the stream, so the copy above is done too
    return host


class BackgroundWriter:
    """Runs a sink's `append` (the H.264 encoder) in its own thread, so encoding overlaps the DiT and the
    VAE. A chunk may come in pieces (`append(piece, end_fragment=False)` ... `append(last)`), which the
    thread encodes as they arrive; at most `maxsize` chunks wait in the queue besides the one being
    encoded (the producer then waits at the first piece of the next chunk). An append error is raised
    in the caller at the next `append` or at `close`, naming the chunk. `close` writes everything
    queued, then closes the sink. `encode_seconds` holds each chunk's encoding time in the thread (its
    pieces summed)."""

    def __init__(self, sink: Any, maxsize: int = 2) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.sink = sink
        self.encode_seconds: list[float] = []
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(maxsize)  # one per chunk waiting in the queue
        self._error: tuple[int, BaseException] | None = None
        self._reported = False
        self._count = 0  # chunks begun by the producer
        self._open = False  # the producer is inside a chunk (its first piece took a slot)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="longlive-video-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        spent, starting = 0.0, True
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            index, frames, end = item
            if starting:  # a chunk leaves the queue: its slot is free
                self._slots.release()
                starting = False
            if self._error is None:  # after a failure: drain, releasing the slots
                try:
                    t0 = time.perf_counter()
                    self.sink.append(frames, end_fragment=end)
                    spent += time.perf_counter() - t0
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._error = (index, exc)
            if end:
                if self._error is None:
                    self.encode_seconds.append(spent)
                spent, starting = 0.0, True

    def _raise(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True  # raised once; `close` in a `finally` then only cleans up
            index, exc = self._error
            raise RuntimeError(f"video writer failed at chunk {index}: {type(exc).__name__}: {exc}") from exc

    def append(self, frames: torch.Tensor, end_fragment: bool = True) -> None:
        if self._closed:
            raise RuntimeError("BackgroundWriter: append after close")
        if self._error is not None:
            self._reported = False  # every append after a failure raises
        self._raise()
        if not self._open:
            while not self._slots.acquire(timeout=0.05):
                self._raise()
            self._open = True
        self._queue.put((self._count, frames, end_fragment))
        if end_fragment:
            self._open = False
            self._count += 1

    def close(self) -> None:
        """Wait for every queued chunk, close the sink, and raise any writer error."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        try:
            self._raise()
        finally:
            close = getattr(self.sink, "close", None)
            if close is not None:
                close()


def decode_mode(streaming_vae: bool, async_vae: bool, vae_device: str | None) -> str:
    """Map the `inference` config fields to a decode mode: "batch" | "sync" | "stream" | "device".

    streaming off -> "batch" (the other two fields are ignored; config validation warns);
    `vae_device` set -> "device" (it wins over `async_vae`); `async_vae` -> "stream"; else "sync".
    """
    if not streaming_vae:
        return "batch"
    if vae_device is not None and str(vae_device).strip():
        return "device"
    if async_vae:
        return "stream"
    return "sync"


@dataclass
class ChunkStats:
    """One chunk: decode = seconds of the VAE decode, the uint8 conversion and the copies to the host (they
    overlap, piece by piece); io = seconds inside `sink.append` (for a `BackgroundWriter` only the hand-over).
    The "stream" mode, whose decode overlaps the DiT, reports the device's decode time and the copy + append."""

    index: int
    frames: int
    decode_seconds: float
    io_seconds: float


@dataclass
class DecodeStats:
    """Per-chunk timings of a decoder, plus the seconds the calling (DiT) thread spent blocked in it.

    In "stream" mode decode and copy seconds are CUDA event times of the side stream.
    """

    chunks: list[ChunkStats] = field(default_factory=list)
    caller_seconds: float = 0.0  # wall time inside submit()/finish() on the calling thread

    @property
    def frames(self) -> int:
        return sum(c.frames for c in self.chunks)

    @property
    def decode_seconds(self) -> float:
        return sum(c.decode_seconds for c in self.chunks)

    @property
    def io_seconds(self) -> float:
        return sum(c.io_seconds for c in self.chunks)

    def summary(self) -> str:
        return (f"{len(self.chunks)} chunk(s), {self.frames} frames: decode {self.decode_seconds:.2f}s, "
                f"io {self.io_seconds:.2f}s, caller blocked {self.caller_seconds:.2f}s")


def decode_batch(vae: Any, latents: torch.Tensor, sink: ChunkDecodeSink) -> DecodeStats:
    """The "batch" mode: decode the whole latent video [1, z, n, h, w] at once and append it to `sink`."""
    _check_batch(latents, "latents")
    t0 = time.perf_counter()
    video = vae.decode(latents)
    _sync(video.device)
    t1 = time.perf_counter()
    frames = frames_to_host(video)
    del video
    sink.append(frames)
    t2 = time.perf_counter()
    stats = DecodeStats([ChunkStats(0, frames.shape[0], t1 - t0, t2 - t1)])
    stats.caller_seconds = t2 - t0
    return stats


def _sync(device: torch.device) -> None:
    """Wait for the current stream of `device` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _pinned_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(t.shape, dtype=dtype or t.dtype, device="cpu", pin_memory=True)


def _pieces_to_sink(pieces: Iterator[torch.Tensor], sink: ChunkDecodeSink, where: str) -> tuple[int, float]:
    """Hand a chunk's decoded pieces ([1, 3, f, H, W], see `StreamingDecoder.iter_chunk`) to `sink` as
    uint8 frames on the CPU, the last one with `end_fragment`, so the encoder starts on a chunk's first
    frames while the VAE decodes the rest.

    On CUDA each piece is converted on the device and copied into pinned memory without blocking; it is
    handed over (after its copy finished) once the next piece's work is issued, so the device always has
    queued work while the host waits. Returns (frames handed over, seconds spent inside `sink.append`).
    """
    held: tuple[torch.Tensor, torch.Tensor, Any] | None = None
    count, in_sink = 0, 0.0

    def hand(item: tuple[torch.Tensor, torch.Tensor, Any], end: bool) -> None:
        nonlocal count, in_sink
        host, bad, copied = item
        if copied is not None:
            copied.synchronize()
        _check_finite(bad, where)
        t0 = time.perf_counter()
        sink.append(host, end_fragment=end)
        in_sink += time.perf_counter() - t0
        count += host.shape[0]

    for video in pieces:
        frames, bad = _frames_on_device(video)
        del video
        copied = None
        if frames.device.type == "cuda":
            host, bad_host = _pinned_like(frames), _pinned_like(bad)
            host.copy_(frames, non_blocking=True)
            bad_host.copy_(bad, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(frames.device))
            frames, bad = host, bad_host
        if held is not None:
            hand(held, end=False)
        held = (frames, bad, copied)
    if held is None:
        raise ValueError(f"{where}: the chunk decoded to no frames")
    hand(held, end=True)
    return count, in_sink


# ------------------------------------------------------------------------------------------ decoders
class ChunkDecoder(abc.ABC):
    """Decodes the latent chunks of ONE video, in order, and hands their frames to a sink.

    submit(k, latents): latents [1, z, n, h, w] on the DiT device; chunk indices strictly increase.
    finish(): wait for everything submitted, hand the remaining frames to the sink, re-raise errors.
    close(): release resources; idempotent, safe in `finally` (chunks not yet decoded are dropped).
    """

    mode: str = ""

    def __init__(self, vae: Any, sink: ChunkDecodeSink) -> None:
        self.vae, self.sink = vae, sink
        self.stats = DecodeStats()
        self._last_index: int | None = None
        self._finished = False
        self._closed = False

    def _check_submit(self, chunk_index: int, latents: torch.Tensor) -> None:
        if self._closed or self._finished:
            raise RuntimeError(f"{self.mode} VAE decoder: submit(chunk {chunk_index}) after "
                               f"{'close' if self._closed else 'finish'}")
        _check_batch(latents, f"latents of chunk {chunk_index}")
        if self._last_index is not None and chunk_index <= self._last_index:
            raise ValueError(f"{self.mode} VAE decoder: chunk {chunk_index} submitted after chunk {self._last_index}; "
                             "chunks must be submitted in order")
        self._last_index = chunk_index

    @abc.abstractmethod
    def submit(self, chunk_index: int, latents: torch.Tensor) -> None:
        """Decode chunk `chunk_index` (now or later, by mode) and hand its frames to the sink."""

    @abc.abstractmethod
    def finish(self) -> None:
        """Wait for every submitted chunk to reach the sink; raise any decode error."""

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "ChunkDecoder":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncChunkDecoder(ChunkDecoder):
    """Decode, copy to the CPU and append on the calling thread; `submit` returns when written."""

    mode = "sync"

    def __init__(self, vae: Any, sink: ChunkDecodeSink | None) -> None:
        super().__init__(vae, sink)
        self._decoder = vae.stream_decoder()

    def _pieces(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        return self._decoder.iter_chunk(latents)

    def submit(self, chunk_index: int, latents: torch.Tensor) -> None:
        self._check_submit(chunk_index, latents)
        t0 = time.perf_counter()
        frames, in_sink = 0, 0.0
        if self.sink is None:  # a rank of a "rows" group without the writer: decode its band only
            for band in self._pieces(latents):  # each piece's gather to the writer runs as it is taken
                del band
            _sync(torch.device(self.vae.device))
        else:
            frames, in_sink = _pieces_to_sink(self._pieces(latents), self.sink, f"chunk {chunk_index}")
        t2 = time.perf_counter()
        self.stats.chunks.append(ChunkStats(chunk_index, frames, t2 - t0 - in_sink, in_sink))
        self.stats.caller_seconds += t2 - t0

    def finish(self) -> None:
        self._finished = True

    def close(self) -> None:
        super().close()
        self._decoder = None


class RowParallelChunkDecoder(SyncChunkDecoder):
    """Every rank of a process group decodes a band of rows of each chunk (`WanVAE.split_rows`,
    `longlive.parallel.vae_decode`); the bands are gathered into whole frames on the group's first rank,
    which holds the sink and appends them (the other ranks pass `sink=None`). All ranks call `submit`
    with the whole latent chunk, in the same order. Synchronous, like "sync"."""

    mode = "rows"

    def __init__(self, vae: Any, sink: ChunkDecodeSink | None, split: Any) -> None:
        if (sink is not None) != (split.index == 0):
            raise ValueError(f"rows VAE decoder: the group's first rank holds the sink and no other does; rank "
                             f"{split.index} of {split.size} was given {'a' if sink is not None else 'no'} sink")
        self.split = split
        super().__init__(vae.split_rows(split), sink)

    def _pieces(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        # each piece's bands are gathered as it is decoded; only the first rank (the writer) gets whole frames
        for band in self._decoder.iter_chunk(latents[..., self.split.rows(latents.shape[-2]), :]):
            whole = self.split.gather_to_first(band)
            yield band if whole is None else whole


@dataclass
class _PendingChunk:
    index: int
    host: torch.Tensor       # pinned [T, H, W, 3] uint8, filled by the side stream
    start: Any               # torch.cuda.Event (timing) before the decode
    decoded: Any             # after the decode
    done: Any                # after the device->host copy
    latents: torch.Tensor    # kept referenced (and record_stream'ed) until `done`
    bad: torch.Tensor        # pinned count of non-finite pixels


class StreamChunkDecoder(ChunkDecoder):
    """Decode on a side CUDA stream of the DiT's device, overlapping the DiT; at most one chunk in flight.

    `submit(k)` first completes chunk k-1 (waits on its copy-done event, appends its pinned host
    frames to the sink), then records an event on the caller's current (DiT) stream, makes the side
    stream wait on it and enqueues decode, conversion and a non-blocking copy into a fresh pinned
    buffer there. The latents are `record_stream`ed and kept referenced until the copy is done; the
    caller must not write into them in place afterwards (the DiT produces a new tensor per chunk).
    The decode's device tensors are released as soon as the copy is enqueued (stream-ordered reuse),
    so the GPU holds at most one chunk's pixels.
    """

    mode = "stream"

    def __init__(self, vae: Any, sink: ChunkDecodeSink) -> None:
        device = torch.device(vae.device)
        if device.type != "cuda":
            raise ValueError(
                f"inference.async_vae (decode mode 'stream') needs CUDA: it overlaps the VAE decode with the DiT "
                f"on a second CUDA stream, but the VAE is on {device}. Set inference.async_vae=false, or use "
                "inference.vae_device for a decode thread on another device."
            )
        super().__init__(vae, sink)
        self.device = device
        self._stream = torch.cuda.Stream(device=device)
        self._decoder = vae.stream_decoder()
        self._pending: _PendingChunk | None = None
        self._failed: BaseException | None = None

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError("stream VAE decoder: an earlier chunk failed; this video cannot continue") from self._failed

    def _complete_pending(self) -> None:
        p, self._pending = self._pending, None
        if p is None:
            return
        try:
            p.done.synchronize()
            _check_finite(p.bad, f"chunk {p.index}")
            decode_s = p.start.elapsed_time(p.decoded) / 1e3
            copy_s = p.decoded.elapsed_time(p.done) / 1e3
            t1 = time.perf_counter()
            self.sink.append(p.host)
            t2 = time.perf_counter()
        except BaseException as exc:
            self._failed = exc
            raise RuntimeError(f"stream VAE decoder: chunk {p.index} failed ({type(exc).__name__}: {exc})") from exc
        self.stats.chunks.append(ChunkStats(p.index, p.host.shape[0], decode_s, copy_s + (t2 - t1)))

    def submit(self, chunk_index: int, latents: torch.Tensor) -> None:
        self._check_failed()
        self._check_submit(chunk_index, latents)
        if latents.device != self.device:
            raise ValueError(f"stream VAE decoder: chunk {chunk_index} latents are on {latents.device}, the VAE on "
                             f"{self.device}; the 'stream' mode decodes on the DiT's device")
        t0 = time.perf_counter()
        self._complete_pending()  # at most one decode in flight
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        start, decoded, done = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        try:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                latents.record_stream(self._stream)
                start.record(self._stream)
                video = self._decoder.decode_chunk(latents)
                decoded.record(self._stream)
                frames, bad = _frames_on_device(video)
                del video
                host = _pinned_like(frames)
                host.copy_(frames, non_blocking=True)
                bad_host = _pinned_like(bad)
                bad_host.copy_(bad, non_blocking=True)
                del frames, bad  # freed for reuse by later side-stream work only (stream-ordered)
                done.record(self._stream)
        except BaseException as exc:
            self._failed = exc
            raise
        self._pending = _PendingChunk(chunk_index, host, start, decoded, done, latents, bad_host)
        self.stats.caller_seconds += time.perf_counter() - t0

    def finish(self) -> None:
        self._check_failed()
        t0 = time.perf_counter()
        self._complete_pending()
        self._finished = True
        self.stats.caller_seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        try:
            self._stream.synchronize()  # nothing may still read the latents or write a host buffer
        except Exception as exc:  # noqa: BLE001 - a CUDA error here must not mask the original one
            log.warning("stream VAE decoder: synchronize on close failed: %s", exc)
        if self._pending is not None:
            log.warning("stream VAE decoder closed with chunk %d decoded but not written", self._pending.index)
        self._pending = None
        self._decoder = None




class DeviceChunkDecoder(ChunkDecoder):
    """Decode on the VAE's own device (`vae.device`: e.g. cuda:1, or cpu) in a background thread.

    `submit` copies the latents off the DiT device (non-blocking into pinned memory from CUDA, a
    clone on the CPU), so the DiT may overwrite its buffer, and puts them in a bounded queue
    (`queue_size`, default 2): a slow VAE blocks the producer. The worker waits for the copy, moves
    the latents to the VAE device, decodes, copies the frames to the host (pinned when the VAE is on
    CUDA) and calls `sink.append`; only the worker touches the sink. A worker error stops the
    worker; the next `submit` or `finish` raises RuntimeError naming the chunk, chained to it.
    """

    mode = "device"
    poll_seconds = 0.05     # how often a producer blocked on a full queue checks the worker
    close_timeout = 120.0   # seconds `close` waits for the chunk the worker is decoding

    def __init__(self, vae: Any, sink: ChunkDecodeSink, queue_size: int = 2) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        super().__init__(vae, sink)
        self.device = torch.device(vae.device)
        self._decoder = vae.stream_decoder()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._cancel = threading.Event()
        self._error: tuple[int, BaseException] | None = None
        self._thread = threading.Thread(target=self._run, name=f"vae-decode-{self.device}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    self._loop()
            else:
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - set up failures are reported like chunk failures
            if self._error is None:
                self._error = (-1, exc)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._cancel.is_set():
                continue
            index, staged, ready = item
            try:
                if ready is not None:
                    ready.synchronize()  # the producer's device->host copy
                t0 = time.perf_counter()
                latents = staged.to(self.device, non_blocking=staged.is_pinned())
                del staged
                frames, in_sink = _pieces_to_sink(self._decoder.iter_chunk(latents), self.sink, f"chunk {index}")
                del latents
                t2 = time.perf_counter()
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self._error = (index, exc)
                return
            self.stats.chunks.append(ChunkStats(index, frames, t2 - t0 - in_sink, in_sink))

    # ------------------------------------------------------------------ producer side
    def _raise_worker_error(self) -> None:
        if self._error is not None:
            index, exc = self._error
            where = f"chunk {index}" if index >= 0 else "start-up"
            raise RuntimeError(f"VAE decode worker on {self.device} failed at {where}: {type(exc).__name__}: {exc}") from exc
        if not self._thread.is_alive() and not (self._finished or self._closed):
            raise RuntimeError(f"VAE decode worker on {self.device} stopped unexpectedly")

    def _put(self, item: object) -> None:
        """Put into the bounded queue, blocking while it is full but never past a dead worker."""
        while True:
            self._raise_worker_error()
            try:
                self._queue.put(item, timeout=self.poll_seconds)
                return
            except queue.Full:
                continue

    def _stage(self, latents: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Copy the latents off the DiT device so the DiT may overwrite its buffer."""
        latents = latents.detach()
        if latents.is_cuda:
            host = _pinned_like(latents)
            host.copy_(latents, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
            return host, ready
        return latents.clone(), None

    def submit(self, chunk_index: int, latents: torch.Tensor) -> None:
        self._raise_worker_error()
        self._check_submit(chunk_index, latents)
        t0 = time.perf_counter()
        staged, ready = self._stage(latents)
        self._put((chunk_index, staged, ready))
        self.stats.caller_seconds += time.perf_counter() - t0

    def finish(self) -> None:
        if self._closed:
            raise RuntimeError("device VAE decoder: finish after close")
        if self._finished:
            self._raise_worker_error()
            return
        t0 = time.perf_counter()
        self._put(_STOP)
        self._finished = True
        while self._thread.is_alive():
            self._thread.join(timeout=1.0)
        self.stats.caller_seconds += time.perf_counter() - t0
        self._raise_worker_error()

    def close(self) -> None:
        """Stop the worker: chunks still queued are dropped; waits (bounded) for the one being decoded."""
        if self._closed:
            return
        super().close()
        if not self._thread.is_alive():
            return
        self._cancel.set()
        dropped = 0
        while True:  # only this (the producer) thread puts, so after draining there is room for _STOP
            try:
                if self._queue.get_nowait() is not _STOP:
                    dropped += 1
            except queue.Empty:
                break
        if dropped:
            log.warning("device VAE decoder closed with %d chunk(s) not decoded", dropped)
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:  # cannot happen with a single producer; the join below then times out and says so
            log.warning("device VAE decoder: could not queue the stop marker (queue full)")
        self._thread.join(timeout=self.close_timeout)
        if self._thread.is_alive():
            log.warning("device VAE decoder: worker still busy after %.0fs; leaving it (daemon thread)", self.close_timeout)


# ------------------------------------------------------------------------------------------ factory
VIDEO_PRESET = "veryfast"  # x264 preset of generated videos: "medium" encodes a 704x1280 chunk slower than the DiT makes it


def open_video_writer(path: Any, fps: float = 24, preset: str = VIDEO_PRESET) -> BackgroundWriter:
    """The MP4 writer of generated videos: an `Mp4Writer` (playable after every chunk) in its own thread."""
    from ..io.video import Mp4Writer

    return BackgroundWriter(Mp4Writer(path, fps=fps, preset=preset))



def make_chunk_decoder(vae: Any, sink: ChunkDecodeSink | None, mode: str, row_split: Any = None) -> ChunkDecoder:
    """A `ChunkDecoder` for `mode` ("sync" | "stream" | "device" | "rows"; see `decode_mode`).

    For "device" the VAE must already be on its dedicated device. "rows" needs `row_split` (a
    `longlive.parallel.vae_decode.RowSplit`) and is created on every rank of its group. "batch" is not
    chunked: decode the finished latents with `decode_batch`.
    """
    if mode == "rows":
        if row_split is None:
            raise ValueError("decode mode 'rows' needs row_split (a RowSplit of the ranks that decode together)")
        return RowParallelChunkDecoder(vae, sink, row_split)
    if mode == "sync":
        return SyncChunkDecoder(vae, sink)
    if mode == "stream":
        return StreamChunkDecoder(vae, sink)
    if mode == "device":
        return DeviceChunkDecoder(vae, sink)
    if mode == "batch":
        raise ValueError("decode mode 'batch' decodes the whole video after the DiT: use decode_batch(vae, latents, sink); "
                         f"chunk decoders are {list(CHUNK_MODES)}")
    raise ValueError(f"unknown VAE decode mode {mode!r}; choose one of {list(DECODE_MODES)} "
                     f"(chunk decoders: {list(CHUNK_MODES)})")


__all__ = [
    "CHUNK_MODES", "DECODE_MODES", "ChunkDecodeSink", "ChunkDecoder", "ChunkStats", "DecodeStats",
    "BackgroundWriter", "DeviceChunkDecoder", "RowParallelChunkDecoder", "StreamChunkDecoder", "SyncChunkDecoder",
    "decode_batch", "decode_mode",
    "frames_to_host", "make_chunk_decoder", "open_video_writer",
]
