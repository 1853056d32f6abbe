"""benchmarks/nvfp4_issue_ceiling.py: the stand-in writes every byte the quantize kernel writes.

Run under the Triton interpreter in a subprocess (TRITON_INTERPRET must be set before triton is
imported): the buffers are filled with 0x00 and then 0xFF before two launches, so a byte the kernel
does not write keeps a different fill in the two outputs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, torch
sys.path[:0] = [{bench!r}, {src!r}]
import nvfp4_issue_ceiling as c
x = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
consts = torch.tensor([0.999, 1e-3])
out = {{}}
for work in (0, 3):
    runs = []
    for fill in (0, 255):
        words = torch.full((128, 128), fill, dtype=torch.uint8)
        scales = torch.full((128 * 16,), fill, dtype=torch.uint8)
        c.launch(x, words, scales, consts, work)
        runs.append((words, scales))
    assert torch.equal(runs[0][0], runs[1][0]), "code bytes left unwritten"
    assert torch.equal(runs[0][1], runs[1][1]), "scale bytes left unwritten"
    out[work] = runs[0][0]
assert not torch.equal(out[0], out[3]), "the multiply-adds do not reach the output"
print("ok")
"""


def test_stand_in_writes_every_output_byte_and_its_work_reaches_the_output() -> None:
    code = SCRIPT.format(bench=str(ROOT / "benchmarks"), src=str(ROOT / "src"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
