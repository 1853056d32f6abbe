"""MP4 writer/reader: round trip of count/fps/size/colour, kill-safety between chunks, resampling, errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from longlive.io.video import (
    Mp4Writer,
    VideoFileError,
    _top_level_boxes,
    frames_to_uint8,
    pick_h264_encoder,
    probe_video,
    read_video,
    resample_indices,
    save_video,
)

H, W = 32, 48


def _chunk(t: int, colour: tuple[float, float, float]) -> torch.Tensor:
    """Float [T,3,H,W] frames of one flat colour (exactly representable after yuv420p)."""
    return torch.tensor(colour).view(1, 3, 1, 1).expand(t, 3, H, W).clone()


def test_roundtrip_count_fps_size_and_colour(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.mp4"
    colours = [(0.8, 0.2, 0.1), (0.1, 0.7, 0.3), (0.2, 0.3, 0.9)]
    with Mp4Writer(path, fps=24) as writer:
        writer.append(_chunk(5, colours[0]))  # [T,3,H,W] float
        writer.append((_chunk(4, colours[1]) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))  # THWC uint8
        writer.append(_chunk(4, colours[2]).numpy())
    assert writer.frames_written == 13
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (13, 24.0, H, W)
    kinds = [k for k, _, _ in _top_level_boxes(path.read_bytes())]
    assert kinds.index("moov") < kinds.index("mdat") and "moof" not in kinds  # faststart plain MP4

    video = read_video(path)
    assert video.shape == (3, 13, H, W) and video.dtype == torch.float32
    means = ((video + 1) / 2).mean(dim=(2, 3))  # [3, T]
    for t, colour in zip((0, 7, 12), colours):
        torch.testing.assert_close(means[:, t], torch.tensor(colour), atol=0.02, rtol=0)


def test_killed_between_chunks_leaves_playable_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.mp4"
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from longlive.io.video import Mp4Writer
        w = Mp4Writer({str(path)!r}, fps=16)
        for v in (60, 180):
            w.append(np.full((4, {H}, {W}, 3), v, np.uint8))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    info = probe_video(path)
    assert (info.num_frames, info.fps) == (8, 16.0)
    video = read_video(path)
    assert video.shape == (3, 8, H, W)
    levels = ((video + 1) / 2 * 255).mean(dim=(0, 2, 3))
    assert torch.allclose(levels[:4], torch.tensor(60.0), atol=2) and torch.allclose(levels[4:], torch.tensor(180.0), atol=2)


def test_fragmented_file_is_valid_after_each_append(tmp_path: Path) -> None:
    path = tmp_path / "live.mp4"
    writer = Mp4Writer(path, fps=8, faststart=False)
    for n in range(1, 3):
        writer.append(torch.rand(3, 3, H, W))
        assert probe_video(path).num_frames == 3 * n
        assert read_video(path).shape[1] == 3 * n
    writer.close()
    kinds = [k for k, _, _ in _top_level_boxes(path.read_bytes())]
    assert kinds == ["ftyp", "moov", "moof", "mdat", "moof", "mdat"]


def test_chunk_appended_in_pieces_is_one_fragment_starting_at_a_keyframe(tmp_path: Path) -> None:
    """`end_fragment=False` encodes without writing; the chunk's pieces become one fragment with one
    keyframe, and `close` writes a fragment still in progress instead of dropping it."""
    import av

    path = tmp_path / "pieces.mp4"
    writer = Mp4Writer(path, fps=8, faststart=False)
    levels = [40, 80, 120, 160, 200]
    writer.append(np.full((1, H, W, 3), levels[0], np.uint8), end_fragment=False)
    writer.append(np.full((4, H, W, 3), levels[1], np.uint8), end_fragment=False)
    assert not path.exists() or path.stat().st_size == 0  # encoded, nothing written yet
    writer.append(np.full((4, H, W, 3), levels[2], np.uint8))  # ends chunk 0: 9 frames
    assert probe_video(path).num_frames == 9
    writer.append(np.full((4, H, W, 3), levels[3], np.uint8), end_fragment=False)
    writer.append(np.full((4, H, W, 3), levels[4], np.uint8), end_fragment=False)
    writer.close()  # chunk 1 (8 frames) still open: written by close
    assert writer.frames_written == 17
    kinds = [k for k, _, _ in _top_level_boxes(path.read_bytes())]
    assert kinds == ["ftyp", "moov", "moof", "mdat", "moof", "mdat"]
    with av.open(str(path)) as f:
        keyframes = [p.is_keyframe for p in f.demux(f.streams.video[0]) if p.dts is not None]
    assert [i for i, k in enumerate(keyframes) if k] == [0, 9]
    got = ((read_video(path) + 1) / 2 * 255).mean(dim=(0, 2, 3))
    want = torch.tensor([levels[0]] + [levels[1]] * 4 + [levels[2]] * 4 + [levels[3]] * 4 + [levels[4]] * 4, dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=2, rtol=0)


def test_resample_indices_and_resize(tmp_path: Path) -> None:
    assert resample_indices(10, 30, 24) == [0, 1, 2, 4, 5, 6, 8, 9]  # round(i * 1.25), half to even
    assert resample_indices(100, 30, 24, start=3, count=4) == [3, 4, 5, 7]
    assert resample_indices(5, 12, 24) == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4]  # upsampling repeats
    path = tmp_path / "ramp.mp4"
    frames = torch.stack([torch.full((3, H, W), i * 20, dtype=torch.uint8) for i in range(10)])
    save_video(frames, path, fps=30)
    clip = read_video(path, fps=24, size=(16, 24), start_frame=1, num_frames=4, dtype=torch.float16)
    assert clip.shape == (3, 4, 16, 24) and clip.dtype == torch.float16
    levels = ((clip.float() + 1) / 2 * 255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(levels, torch.tensor([20.0, 40.0, 60.0, 100.0]), atol=3, rtol=0)  # src 1,2,3,5
    with pytest.raises(VideoFileError, match="ramp.mp4.*10 source frame"):
        read_video(path, fps=24, num_frames=20)


def test_frame_conversion_and_errors(tmp_path: Path) -> None:
    x = torch.tensor([0.0, 0.5, 1.2, -1.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    out = frames_to_uint8(x)
    assert out.shape == (4, 2, 2, 3) and out[:, 0, 0, 0].tolist() == [0, 128, 255, 0]
    assert frames_to_uint8(x.unsqueeze(0)).shape == (4, 2, 2, 3)
    with pytest.raises(ValueError, match="NaN"):
        frames_to_uint8(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="nan.mp4: frames contain"):
        Mp4Writer(tmp_path / "nan.mp4").append(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="colour channels"):
        frames_to_uint8(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="even height and width"):
        Mp4Writer(tmp_path / "odd.mp4").append(torch.zeros(1, 3, 31, 48))
    writer = Mp4Writer(tmp_path / "size.mp4")
    writer.append(torch.zeros(1, 3, H, W))
    with pytest.raises(ValueError, match="size.mp4.*differs"):
        writer.append(torch.zeros(1, 3, H, W + 2))
    writer.close()
    assert pick_h264_encoder() == "libx264"
    with pytest.raises(VideoFileError, match="no H.264 encoder"):
        pick_h264_encoder(("libnot_a_codec",))
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 10)
    with pytest.raises(VideoFileError, match="junk.mp4"):
        read_video(tmp_path / "junk.mp4")
