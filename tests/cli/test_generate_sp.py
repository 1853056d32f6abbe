"""`longlive generate` under a torchrun-like launch (gloo on CPU): sequence-parallel groups write the
same videos as one process, every prompt exactly once, files only from each group's first rank."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longlive.cli.main import main
from longlive.io.video import probe_video, read_video

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, args: list[str], tmp_path: Path) -> list[str]:
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "longlive.cli.main", "generate", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, "\n".join(o[-3000:] for o in outs)
    return outs


def _latents(folder: Path) -> dict[str, torch.Tensor]:
    return {p.name: torch.load(p, weights_only=True)["latents"] for p in sorted(folder.glob("*.pt"))}


def test_sp2_multishot_equals_single_process_and_one_rank_writes(tmp_path):
    """The tiny config: 4 chunks, 3 shots (cuts, pins, RoPE offsets), rolling window with a sink."""
    common = ["--config", TINY, "--no-progress", "inference.save_latents_only=true"]
    assert main(["generate", *common, "--output-folder", str(tmp_path / "one")]) == 0
    _launch(2, [*common, "--output-folder", str(tmp_path / "sp"), "sp_size=2"], tmp_path)
    one, sp = _latents(tmp_path / "one"), _latents(tmp_path / "sp")
    assert list(sp) == list(one) == ["0000-tiny_multishot-seed0.pt"]
    torch.testing.assert_close(sp[next(iter(sp))], one[next(iter(one))], rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["0000-tiny_multishot-seed0.prompts.txt",
                                                                    "0000-tiny_multishot-seed0.pt"]


def test_sp2_dp2_spreads_prompts_and_streams_mp4(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\na green cone\n")
    small = [f"data.data_path={prompts}", "data.image_or_video_shape=[1,16,48,2,2]", "model_kwargs.local_attn_size=16",
             "inference.sink_size=0", "inference.multi_shot_sink=false"]
    common = ["--config", TINY, "--no-progress", *small]
    _launch(4, [*common, "--output-folder", str(tmp_path / "sp"), "sp_size=2", "dp_size=2", "inference.streaming_vae=true"],
            tmp_path)
    videos = sorted((tmp_path / "sp").glob("*.mp4"))
    assert [v.name.split("-")[0] for v in videos] == ["0000", "0001", "0002"]
    assert all(probe_video(v).num_frames == 1 + 4 * 15 for v in videos)
    # the latents of the same layout equal a single process's
    _launch(4, [*common, "--output-folder", str(tmp_path / "spl"), "sp_size=2", "inference.save_latents_only=true"], tmp_path)
    assert main(["generate", *common, "--output-folder", str(tmp_path / "one"), "inference.save_latents_only=true"]) == 0
    one, sp = _latents(tmp_path / "one"), _latents(tmp_path / "spl")
    assert list(sp) == list(one) and len(one) == 3
    for name in one:
        torch.testing.assert_close(sp[name], one[name], rtol=1e-5, atol=1e-5)


def test_sp2_rows_decode_writes_the_frames_of_writer_decode(tmp_path):
    """Under SP both ranks decode a band of rows of each chunk (the default); the MP4 holds exactly the
    frames of the first rank decoding alone (`inference.sp_vae_decode=writer`)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    common = ["--config", TINY, "--no-progress", f"data.data_path={prompts}", "data.image_or_video_shape=[1,16,48,4,4]",
              "model_kwargs.local_attn_size=16", "inference.sink_size=0", "inference.multi_shot_sink=false",
              "inference.streaming_vae=true", "sp_size=2"]
    outs = _launch(2, [*common, "--output-folder", str(tmp_path / "rows")], tmp_path)
    assert "rows decode:" in outs[0], outs[0][-2000:]
    outs = _launch(2, [*common, "--output-folder", str(tmp_path / "writer"), "inference.sp_vae_decode=writer"], tmp_path)
    assert "sync decode:" in outs[0], outs[0][-2000:]
    (rows,), (writer,) = sorted((tmp_path / "rows").glob("*.mp4")), sorted((tmp_path / "writer").glob("*.mp4"))
    a, b = read_video(rows), read_video(writer)
    assert a.shape == b.shape == (3, 1 + 4 * 15, 64, 64)
    assert torch.equal(a, b)


def test_sp_size_errors_name_the_fields(tmp_path):
    with pytest.raises(ValueError, match=r"sp_size: 2 needs 2 x dp_size processes; launch with torchrun --nproc_per_node=2"):
        main(["generate", "--config", TINY, "--no-progress", "sp_size=2", "--output-folder", str(tmp_path)])
    from longlive.config import ConfigError

    with pytest.raises(ConfigError, match="sp_size"):
        main(["generate", "--config", TINY, "--no-progress", "sp_size=3", "--output-folder", str(tmp_path)])
