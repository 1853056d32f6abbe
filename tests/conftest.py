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
