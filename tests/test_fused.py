"""The fused path's selection and registry wiring, its interpreter suite (a subprocess), and its GPU checks.

``tests/fused_cases.py`` compares the Triton kernels with the PyTorch path on CPU; it needs TRITON_INTERPRET=1
before triton is first imported, which the rest of the suite has already done, hence the subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mabn.norms import BatchNorm2d, MABN2d, _fused, build_norm

from .fused_layers import batch, check, compare_state, make, step

ROOT = Path(__file__).resolve().parents[1]


def test_fused_cases_under_the_triton_interpreter():
    """Fused == torch on CPU (dtypes, layouts, groupings, phases, state dicts, launch budget)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fused_cases.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_impl_selection():
    """auto runs torch on CPU and float64; fused refuses what it does not cover; impl is validated."""
    with pytest.raises(ValueError, match="impl must be one of"):
        MABN2d(4, impl="triton")
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    for name in ("bn", "brn", "mabn"):
        with pytest.raises(ValueError, match="float64"):
            make(name, "fused").double()(x)
        assert make(name, "auto").impl == "auto"
    assert not _fused.use_fused("auto", torch.randn(2, 3, 4, 4), [], "MABN2d")  # CPU: torch
    with pytest.raises(ValueError, match="affine"):
        BatchNorm2d(5, affine=False, impl="fused")(x.float())
    odd = torch.randn(4, 5, 6, 6)[:, :, ::2, ::2]  # strides no (N, C, S) view covers
    assert "strides" in _fused.uncovered(odd, [])


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_registry_passes_impl(name):
    assert build_norm({"name": name, "impl": "fused"}).ctor(8).impl == "fused"
    assert build_norm(name).ctor(8).impl == "auto"
    with pytest.raises(ValueError, match="impl"):
        build_norm({"name": name, "impl": "cuda"})


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_eval_and_empty_batch_keep_the_torch_path(name):
    """Eval mode and N = 0 never launch a kernel (no state change)."""
    fused, ref = make(name, "fused"), make(name, "torch")
    ref.load_state_dict(fused.state_dict())
    empty = torch.randn(0, 5, 3, 3)
    assert fused(empty).shape == empty.shape and int(fused.num_batches_tracked) == 0
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(fused.eval()(x), ref.eval()(x))


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [None, 2], ids=["whole", "n2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_gpu_fused_equals_torch(name, dtype, group_size):
    """On CUDA, channels_last: fused (auto picks it) == torch, every step and buffer, through all phases."""
    ref = make(name, "torch", group_size, channels=32).cuda()
    fused = make(name, "auto", group_size, channels=32).cuda()
    fused.load_state_dict(ref.state_dict())
    for i in range(10):
        x, dy = (t.cuda() for t in batch((8, 32, 7, 7), i, dtype, True))
        before = _fused.LAUNCHES[0]
        a, b = step(fused, x, dy), step(ref, x, dy)
        assert _fused.LAUNCHES[0] - before == 6, "auto must take the fused path on CUDA"
        check(a, b, dtype, f"{name} {dtype} step {i}")
        compare_state(fused, ref, f"{name} step {i}")
