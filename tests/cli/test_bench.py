"""`longlive bench` on CPU with the tiny preset: a real generation timed, reported as JSON and a table."""
import json

import pytest

from longlive.cli.main import main

TINY = ["--preset", "tiny", "--height", "64", "--width", "64", "--device", "cpu", "--vae", "tiny",
        "--chunk-frames", "4", "--window", "12", "--sink", "4", "--chunks", "5", "--steps", "2"]


@pytest.mark.parametrize("decode", ["sync", "batch", "device", "none"])
def test_bench_reports_steady_state_and_end_to_end(tmp_path, capsys, decode):
    out = tmp_path / "r.json"
    extra = ["--vae-device", "cpu"] if decode == "device" else []
    assert main(["bench", *TINY, "--decode", decode, *extra, "--json", str(out), "--output-dir", str(tmp_path / "v")]) == 0
    r = json.loads(out.read_text())
    assert r["steady_chunks"] == [2, 3, 4]  # a window of 3 chunks is full from chunk 2 on
    assert r["denoise_fps_steady"] > 0 and r["loop_fps_all_chunks"] > 0
    assert r["pixel_frames"] == 1 + 4 * (5 * 4 - 1)
    assert r["seconds_per_chunk"]["dit"] > 0 and r["seconds_per_chunk"]["refresh"] > 0
    assert r["warmup"]["chunks"] == 4 and r["software"]["torch"]
    if decode == "none":
        assert r["end_to_end_fps"] is None and not (tmp_path / "v" / "bench.mp4").exists()
    else:
        assert r["frames_written"] == r["pixel_frames"] and r["video_bytes"] > 0
        assert 0 < r["end_to_end_fps"] < r["loop_fps_all_chunks"]
        assert (tmp_path / "v" / "bench.mp4").stat().st_size == r["video_bytes"]
        assert 0 < r["remux_seconds"] <= r["close_seconds"] < r["wall_seconds"]  # the tail after the last chunk
    if decode in ("sync", "device"):
        assert r["seconds_per_chunk"]["vae"] > 0 and r["seconds_per_chunk"]["io"] > 0
    table = capsys.readouterr().out
    assert "denoising loop, steady" in table and "end to end" in table


def test_bench_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="--decode device needs --vae-device"):
        main(["bench", *TINY, "--decode", "device"])
    with pytest.raises(ValueError, match="multiples of 32"):
        main(["bench", "--preset", "tiny", "--height", "70", "--device", "cpu"])


def test_bench_rows_decode_needs_torchrun():
    with pytest.raises(ValueError, match="--decode rows decodes on all ranks"):
        main(["bench", *TINY, "--decode", "rows"])


def test_bench_rows_decode_under_a_two_process_launch(tmp_path):
    """`--decode rows` with gloo on CPU: both ranks decode bands, rank 0 writes every frame once."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "r.json"
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "longlive.cli.main", "bench", *TINY, "--decode", "rows",
                                       "--json", str(out), "--output-dir", str(tmp_path / "v")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    r = json.loads(out.read_text())
    assert r["sp_size"] == 2
    assert r["frames_written"] == r["pixel_frames"] == 1 + 4 * (5 * 4 - 1)
    assert (tmp_path / "v" / "bench.mp4").stat().st_size == r["video_bytes"] > 0
    assert r["seconds_per_chunk"]["vae"] > 0
