import os
import subprocess
import sys

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread: tiny convolutions are fastest so, bit-equal comparisons with
    worker threads need the same thread count, and shared CPUs see no OpenMP spin contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def interpreter_results(request) -> dict:
    """What the requesting test module prints when run as a script under TRITON_INTERPRET=1: the JSON after
    its `RESULT_TAG` on the last tagged stdout line (Triton kernels checked on CPU in a child process)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    tag = request.module.RESULT_TAG
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(request.module.__file__)], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
    assert proc.returncode == 0 and lines, f"interpreter child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len(tag):])


@pytest.fixture(scope="session")
def launch_workers():
    """`launch_workers(script, world, out_dir)`: run a test file as a script, one process per rank (its
    `--worker OUT_DIR` entry: gloo, FileStore rendezvous in `out_dir`), and load what each rank saved to
    `out_dir/rank{r}.pt`; returns (results, logs)."""
    return _launch_workers


def _launch_workers(script: str, world: int, out_dir, timeout: float = 150) -> tuple[list[dict], list[str]]:
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, script, "--worker", str(out_dir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {world} exited with {p.returncode}:\n{log}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)], logs
