"""VAE decode modes of long-video inference: every mode writes the frames of a whole-video decode, in order."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from longlive.io.video import frames_to_uint8

from longlive.models.vae import WanVAE, WanVAEConfig
from longlive.pipelines.decode import (
    ChunkDecoder,
    DeviceChunkDecoder,
    decode_batch,
    decode_mode,
    frames_to_host,
    BackgroundWriter,
    make_chunk_decoder,
)

CHUNK = 2  # latent frames per chunk
CHUNKS = 3
WAIT = 10.0  # generous upper bound for waits that normally end in milliseconds


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread for every test here (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(WanVAEConfig.preset("tiny")).eval()


def _latents(chunks: int = CHUNKS, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 48, chunks * CHUNK, 2, 3, generator=torch.Generator().manual_seed(seed))


def _chunk(z: torch.Tensor, k: int) -> torch.Tensor:
    return z[:, :, k * CHUNK : (k + 1) * CHUNK]


def _frames_of_chunk(k: int) -> int:
    return 1 + 4 * (CHUNK - 1) if k == 0 else 4 * CHUNK


class ListSink:
    """Keeps every appended chunk (its pieces joined), the pieces per chunk and the thread that appended."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.pieces: list[int] = []
        self.threads: list[str] = []
        self._open: list[torch.Tensor] = []

    def append(self, frames: torch.Tensor, end_fragment: bool = True) -> None:
        self._open.append(frames.clone())  # pieces may live in reused pinned buffers: keep a copy
        self.threads.append(threading.current_thread().name)
        if end_fragment:
            self.chunks.append(torch.cat(self._open))
            self.pieces.append(len(self._open))
            self._open = []


def _run(decoder: ChunkDecoder, z: torch.Tensor) -> None:
    try:
        for k in range(z.shape[2] // CHUNK):
            decoder.submit(k, _chunk(z, k))
        decoder.finish()
    finally:
        decoder.close()


def _check_output(sink: ListSink, decoder: ChunkDecoder, expected: torch.Tensor, chunks: int = CHUNKS) -> None:
    assert [c.shape[0] for c in sink.chunks] == [_frames_of_chunk(k) for k in range(chunks)]
    for c in sink.chunks:
        assert c.dtype == torch.uint8 and c.device.type == "cpu" and c.shape[1:] == expected.shape[1:]
    assert torch.equal(torch.cat(sink.chunks), expected)
    stats = decoder.stats
    assert [c.index for c in stats.chunks] == list(range(chunks))
    assert [c.frames for c in stats.chunks] == [_frames_of_chunk(k) for k in range(chunks)]
    assert all(c.decode_seconds >= 0 and c.io_seconds >= 0 for c in stats.chunks)
    assert stats.frames == expected.shape[0] and stats.caller_seconds >= 0
    assert "chunk(s)" in stats.summary()


# ------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("mode", ["sync", "device"])
def test_cpu_modes_equal_whole_video_decode(vae: WanVAE, mode: str) -> None:
    z = _latents()
    expected = frames_to_host(vae.decode(z))
    assert expected.shape == (1 + 4 * (CHUNKS * CHUNK - 1), 32, 48, 3)
    assert expected.min() < expected.max()
    sink = ListSink()
    decoder = make_chunk_decoder(vae, sink, mode)
    assert decoder.mode == mode
    _run(decoder, z)
    _check_output(sink, decoder, expected)
    assert sink.pieces == [CHUNK] * CHUNKS  # each latent frame's pixels handed over as decoded
    main = threading.current_thread().name
    if mode == "sync":
        assert set(sink.threads) == {main}
    else:  # only the worker touches the sink
        assert main not in sink.threads and len(set(sink.threads)) == 1


def test_frames_to_host_matches_the_pipeline_conversion(vae: WanVAE) -> None:
    video = vae.decode(_latents(1))
    got = frames_to_host(video)
    floats = video[0].permute(1, 0, 2, 3).float().add(1).mul(0.5).clamp(0, 1)
    assert torch.equal(got, torch.from_numpy(frames_to_uint8(floats)))  # what the MP4 writer makes of floats
    assert got.is_contiguous() and got.dtype == torch.uint8


def test_non_finite_pixels_are_refused(vae: WanVAE) -> None:
    video = vae.decode(_latents(1))
    video[0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf pixel"):
        frames_to_host(video)


class _SlowSink(ListSink):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.fail_at, self.closed = fail_at, False
        self.release = threading.Event()

    def append(self, frames: torch.Tensor, end_fragment: bool = True) -> None:
        self.release.wait(WAIT)
        if self.fail_at is not None and len(self.chunks) == self.fail_at:
            raise OSError("disk full")
        super().append(frames, end_fragment)

    def close(self) -> None:
        self.closed = True


def test_background_writer_keeps_order_bounds_its_queue_and_closes_the_sink() -> None:
    sink = _SlowSink()
    writer = BackgroundWriter(sink, maxsize=2)
    chunks = [torch.full((1, 2, 2, 3), i, dtype=torch.uint8) for i in range(6)]
    producer = threading.Thread(target=lambda: [writer.append(c) for c in chunks])
    producer.start()
    producer.join(0.3)
    assert producer.is_alive() and writer._queue.qsize() == 2  # blocked: one in the sink, two queued
    sink.release.set()
    producer.join(WAIT)
    writer.close()
    assert sink.closed and [int(c[0, 0, 0, 0]) for c in sink.chunks] == list(range(6))
    assert len(writer.encode_seconds) == 6 and threading.current_thread().name not in sink.threads


def test_background_writer_takes_chunks_in_pieces_and_bounds_whole_chunks() -> None:
    sink = _SlowSink()
    writer = BackgroundWriter(sink, maxsize=1)
    piece = lambda i, j: torch.full((1, 2, 2, 3), 10 * i + j, dtype=torch.uint8)  # noqa: E731

    def produce() -> None:
        for i in range(3):
            for j in range(4):
                writer.append(piece(i, j), end_fragment=j == 3)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(0.3)
    # chunk 0 is in the sink (its first piece), chunk 1 waits whole in the queue; chunk 2 may not start
    assert producer.is_alive() and writer._queue.qsize() == 3 + 4
    sink.release.set()
    producer.join(WAIT)
    writer.close()
    assert [c[:, 0, 0, 0].tolist() for c in sink.chunks] == [[10 * i + j for j in range(4)] for i in range(3)]
    assert sink.pieces == [4, 4, 4] and len(writer.encode_seconds) == 3


def test_background_writer_error_names_the_chunk() -> None:
    sink = _SlowSink(fail_at=1)
    sink.release.set()
    writer = BackgroundWriter(sink)
    frames = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="video writer failed at chunk 1: OSError: disk full"):
        for _ in range(50):
            writer.append(frames)
            time.sleep(0.01)
        writer.close()
    writer.close()  # idempotent
    assert sink.closed


def test_decode_batch_writes_the_whole_video(vae: WanVAE) -> None:
    z = _latents()
    sink = ListSink()
    stats = decode_batch(vae, z, sink)
    assert len(sink.chunks) == 1 and torch.equal(sink.chunks[0], frames_to_host(vae.decode(z)))
    assert stats.frames == 1 + 4 * (CHUNKS * CHUNK - 1) and stats.decode_seconds >= 0 and stats.io_seconds >= 0


def test_device_mode_latents_are_copied_at_submit(vae: WanVAE) -> None:
    """The producer may overwrite its latent buffer right after `submit` returns."""
    z = _latents()
    expected = frames_to_host(vae.decode(z))
    sink = ListSink()
    decoder = make_chunk_decoder(vae, sink, "device")
    buffer = torch.empty_like(_chunk(z, 0))
    try:
        for k in range(CHUNKS):
            buffer.copy_(_chunk(z, k))
            decoder.submit(k, buffer)
        buffer.fill_(float("nan"))
        decoder.finish()
    finally:
        decoder.close()
    assert torch.equal(torch.cat(sink.chunks), expected)


# ------------------------------------------------------------------------------------ errors
class FailingSink(ListSink):
    def __init__(self, fail_at: int, release: threading.Event | None = None) -> None:
        super().__init__()
        self.fail_at, self.release = fail_at, release
        self.entered = threading.Event()

    def append(self, frames: torch.Tensor, end_fragment: bool = True) -> None:
        if len(self.chunks) == self.fail_at:
            self.entered.set()
            if self.release is not None:
                assert self.release.wait(WAIT)
            raise OSError("disk full")
        super().append(frames, end_fragment)


def _close_promptly(decoder: ChunkDecoder) -> None:
    t0 = time.perf_counter()
    decoder.close()
    decoder.close()  # idempotent
    assert time.perf_counter() - t0 < 2.0


def test_device_worker_error_surfaces_with_the_chunk(vae: WanVAE) -> None:
    z = _latents(4)
    sink = FailingSink(fail_at=1)
    decoder = make_chunk_decoder(vae, sink, "device")
    with pytest.raises(RuntimeError, match="chunk 1") as info:
        for k in range(4):
            decoder.submit(k, _chunk(z, k))
        decoder.finish()
    assert isinstance(info.value.__cause__, OSError) and "disk full" in str(info.value)
    assert len(sink.chunks) == 1
    with pytest.raises(RuntimeError, match="chunk 1"):  # stays failed
        decoder.finish()
    _close_promptly(decoder)


def test_device_worker_error_unblocks_a_producer_waiting_on_a_full_queue(vae: WanVAE) -> None:
    z = _latents(4)
    release = threading.Event()
    sink = FailingSink(fail_at=0, release=release)
    decoder = make_chunk_decoder(vae, sink, "device")
    assert isinstance(decoder, DeviceChunkDecoder)
    decoder.submit(0, _chunk(z, 0))
    assert sink.entered.wait(WAIT)  # the worker holds chunk 0, inside append
    caught: list[BaseException] = []

    def produce() -> None:
        try:
            for k in range(1, 4):  # chunks 1 and 2 fill the queue, chunk 3 blocks
                decoder.submit(k, _chunk(z, k))
        except BaseException as exc:  # noqa: BLE001
            caught.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + WAIT
    while decoder._queue.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert decoder._queue.full()
    release.set()  # chunk 0's append now raises; the blocked producer must notice
    producer.join(WAIT)
    assert not producer.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], RuntimeError) and "chunk 0" in str(caught[0])
    _close_promptly(decoder)


def test_device_queue_is_bounded(vae: WanVAE) -> None:
    z = _latents(4)
    release = threading.Event()

    class BlockingSink(ListSink):
        entered = threading.Event()

        def append(self, frames: torch.Tensor, end_fragment: bool = True) -> None:
            self.entered.set()
            assert release.wait(WAIT)
            super().append(frames, end_fragment)

    sink = BlockingSink()
    decoder = make_chunk_decoder(vae, sink, "device")
    assert isinstance(decoder, DeviceChunkDecoder) and decoder._queue.maxsize == 2
    try:
        decoder.submit(0, _chunk(z, 0))
        assert sink.entered.wait(WAIT)  # the worker is stuck in append with chunk 0
        decoder.submit(1, _chunk(z, 1))
        decoder.submit(2, _chunk(z, 2))
        assert decoder._queue.qsize() == 2
        third = threading.Thread(target=decoder.submit, args=(3, _chunk(z, 3)))
        third.start()
        third.join(0.3)
        assert third.is_alive(), "submit should block while the queue holds 2 chunks"
        assert decoder._queue.qsize() == 2
        release.set()
        third.join(WAIT)
        assert not third.is_alive()
        decoder.finish()
    finally:
        release.set()
        decoder.close()
    assert torch.equal(torch.cat(sink.chunks), frames_to_host(vae.decode(z)))


def test_device_close_without_finish_drops_queued_chunks(vae: WanVAE) -> None:
    z = _latents(4)
    release = threading.Event()

    class SlowSink(ListSink):
        entered = threading.Event()

        def append(self, frames: torch.Tensor, end_fragment: bool = True) -> None:
            self.entered.set()
            assert release.wait(WAIT)
            super().append(frames, end_fragment)

    sink = SlowSink()
    decoder = make_chunk_decoder(vae, sink, "device")
    assert isinstance(decoder, DeviceChunkDecoder)
    decoder.submit(0, _chunk(z, 0))
    assert sink.entered.wait(WAIT)
    decoder.submit(1, _chunk(z, 1))
    decoder.submit(2, _chunk(z, 2))
    closer = threading.Thread(target=decoder.close)
    closer.start()
    assert decoder._cancel.wait(WAIT)  # from here on the worker skips whatever it still gets
    release.set()
    closer.join(WAIT)
    assert not closer.is_alive() and not decoder._thread.is_alive()
    assert len(sink.chunks) == 1  # chunk 0 finished, 1 and 2 dropped
    _close_promptly(decoder)
    with pytest.raises(RuntimeError, match="after close"):
        decoder.submit(3, _chunk(z, 3))


def test_submit_checks(vae: WanVAE) -> None:
    z = _latents()
    for mode in ("sync", "device"):
        decoder = make_chunk_decoder(vae, ListSink(), mode)
        try:
            with pytest.raises(ValueError, match="batch size 1"):
                decoder.submit(0, torch.cat([_chunk(z, 0)] * 2))
            decoder.submit(0, _chunk(z, 0))
            with pytest.raises(ValueError, match="in order"):
                decoder.submit(0, _chunk(z, 1))
            decoder.finish()
            with pytest.raises(RuntimeError, match="after finish"):
                decoder.submit(1, _chunk(z, 1))
        finally:
            decoder.close()
    with pytest.raises(ValueError, match="batch size 1"):
        frames_to_host(torch.zeros(2, 3, 1, 16, 16))


def test_stream_mode_on_cpu_needs_cuda(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"inference\.async_vae.*needs CUDA"):
        make_chunk_decoder(vae, ListSink(), "stream")


def test_factory_rejects_unknown_and_batch_modes(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"'turbo'.*'batch', 'sync', 'stream', 'device'"):
        make_chunk_decoder(vae, ListSink(), "turbo")
    with pytest.raises(ValueError, match="decode_batch"):
        make_chunk_decoder(vae, ListSink(), "batch")


@pytest.mark.parametrize(
    ("streaming", "async_vae", "vae_device", "mode"),
    [
        (False, False, None, "batch"),
        (False, True, "cuda:1", "batch"),
        (True, False, None, "sync"),
        (True, True, None, "stream"),
        (True, False, "cuda:1", "device"),
        (True, True, "cpu", "device"),
    ],
)
def test_decode_mode_mapping(streaming: bool, async_vae: bool, vae_device: str | None, mode: str) -> None:
    assert decode_mode(streaming, async_vae, vae_device) == mode


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sync", "stream", "device"])
def test_cuda_modes_equal_whole_video_decode(mode: str) -> None:
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.preset("tiny")).eval().cuda()
    z = _latents().cuda()
    expected = frames_to_host(vae.decode(z))
    sink = ListSink()
    decoder = make_chunk_decoder(vae, sink, mode)
    try:
        for k in range(CHUNKS):
            x = _chunk(z, k).clone()  # a fresh tensor per chunk, as the DiT produces
            decoder.submit(k, x)
            del x
            if mode == "stream":  # the diffusion stream keeps working meanwhile
                torch.randn(1 << 20, device="cuda").mul_(2)
        decoder.finish()
    finally:
        decoder.close()
    _check_output(sink, decoder, expected)
