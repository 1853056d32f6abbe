"""`longlive` CLI with the timed generation of `longlive bench` under torch.profiler: each rank writes its
kernel table (sorted by device time) to $OUT/prof_rank{R}_ws{W}.txt (or the working directory).

    torchrun --nproc_per_node=2 benchmarks/bench_profile.py bench --compile --chunks 4 --steps 4 --decode none
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import longlive.pipelines.bench as bench  # noqa: E402
from longlive.cli.main import main  # noqa: E402

_generate = bench.generate_latents
_calls = [0]


def _profiled(*args, **kwargs):
    """The first call (the warm-up generation) runs as is; the second (the timed one) under the profiler."""
    _calls[0] += 1
    if _calls[0] < 2:
        return _generate(*args, **kwargs)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = _generate(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    name = f"prof_rank{os.environ.get('RANK', '0')}_ws{os.environ.get('WORLD_SIZE', '1')}.txt"
    path = Path(os.environ.get("OUT", ".")) / name
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90))
    return out


if __name__ == "__main__":
    bench.generate_latents = _profiled
    sys.exit(main(sys.argv[1:]))
