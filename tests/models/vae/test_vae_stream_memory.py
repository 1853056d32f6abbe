"""Peak memory of a streaming decode does not grow with the number of chunks (CPU, measured).

Measurement: peak resident set size (VmHWM in /proc/self/status) of a child process, reset before
each run by writing "5" to /proc/self/clear_refs (Linux >= 4.0). The child runs with one thread,
one malloc arena and a fixed 64 KiB mmap threshold, so freed tensors go back to the OS at once and
RSS follows live tensor memory. Each run decodes n chunks and drops every decoded chunk, as a
caller that moves frames off the device does. A control run that keeps all decoded chunks must
show the growth, so the measurement is known to be sensitive.
"""
from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLEAR_REFS = Path("/proc/self/clear_refs")
LATENT_HW = 8  # latent 8x8 -> 128x128 pixels
CHUNK_BYTES = 3 * 8 * (16 * LATENT_HW) ** 2 * 4  # one decoded 2-latent steady-state chunk, fp32


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match, f"{field} not in /proc/self/status"
    return int(match.group(1))


def _measure() -> dict[str, dict[int, int]]:
    """Runs in the child: peak RSS growth (bytes) of streaming decodes of 2, 4, 8 chunks."""
    import torch

    from longlive.models.vae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.preset("tiny")).eval()
    chunks = [torch.randn(1, 48, 2, LATENT_HW, LATENT_HW) for _ in range(8)]

    def peak_growth(n: int, keep: bool) -> int:
        gc.collect()
        CLEAR_REFS.write_text("5")  # peak RSS := current RSS
        before = _status_kb("VmRSS")
        dec = vae.stream_decoder()
        kept = []
        for chunk in chunks[:n]:
            frames = dec.decode_chunk(chunk)
            if keep:
                kept.append(frames)
            del frames
        return (_status_kb("VmHWM") - before) * 1024

    peak_growth(2, keep=False)  # warm-up
    return {
        "streaming": {n: peak_growth(n, keep=False) for n in (2, 4, 8)},
        "keep_all": {n: peak_growth(n, keep=True) for n in (2, 8)},
    }


@pytest.mark.skipif(not CLEAR_REFS.exists(), reason="needs Linux /proc/self/clear_refs to reset peak RSS")
def test_stream_decode_peak_memory_flat_in_chunk_count() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks = {int(k): v for k, v in result["streaming"].items()}
    leaky = {int(k): v for k, v in result["keep_all"].items()}
    report = f"streaming peaks {peaks}, keep-all control {leaky}, one chunk = {CHUNK_BYTES} bytes"
    # decoded length grows 4x from 2 to 8 chunks; the peak may not grow by a whole chunk
    assert peaks[4] - peaks[2] < CHUNK_BYTES, report
    assert peaks[8] - peaks[2] < CHUNK_BYTES, report
    # keeping the outputs grows the peak by ~6 chunks: the measurement does see such growth
    assert leaky[8] - leaky[2] > 4 * CHUNK_BYTES, report


if __name__ == "__main__":
    print(json.dumps(_measure()))
