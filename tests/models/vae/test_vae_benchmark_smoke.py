"""benchmarks/vae_decode.py runs on CPU with the tiny preset and writes its JSON to $OUT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "vae_decode.py"


def test_vae_decode_benchmark_runs_on_cpu(tmp_path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--dtype", "fp32",
         "--chunk-latents", "2", "--warmup", "0", "--iters", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "vae_decode.json").read_text())
    assert result["first_chunk"]["frames"] == 5 and result["steady_chunk"]["frames"] == 8
    assert result["steady_chunk"]["median_ms"] > 0 and result["feature_cache_bytes"] > 0
    assert result["pixel_hw"] == [32, 48]
