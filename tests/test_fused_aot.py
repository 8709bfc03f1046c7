"""Every fused kernel variant the layers launch compiles ahead of time for sm_80 and sm_90, without spills.

The variants are captured from real launches under Triton's interpreter (a subprocess: TRITON_INTERPRET=1 must
be set before triton is imported), then compiled with the ptxas of the triton wheel and read with its
cuobjdump (``mabn/norms/_aot.py``): no GPU is needed, and nothing here is typed by hand.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"stats_kernel", "affine_kernel", "grad_stats_kernel", "centered_state_kernel", "centered_grad_kernel",
           "mabn_state_kernel", "mabn_grad_kernel"}


def _run(args, env):
    out = subprocess.run([sys.executable, "-m", "mabn.norms._aot", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_every_launched_variant_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    _run(["capture", str(tmp_path / "variants.json")], {**base, "TRITON_INTERPRET": "1"})
    variants = json.loads((tmp_path / "variants.json").read_text())
    assert {v["kernel"] for v in variants} == KERNELS
    # every dtype the layers accept reaches the elementwise and reduction kernels
    assert {a for v in variants if v["kernel"] == "affine_kernel" for a in v["args"]} >= {"*fp32", "*bf16", "*fp16"}
    env = {k: v for k, v in base.items() if k != "TRITON_INTERPRET"}
    _run(["compile", str(tmp_path / "variants.json"), "--arch", "80", "90", "--out", str(tmp_path / "res.json")],
         env)
    rows = json.loads((tmp_path / "res.json").read_text())
    assert len(rows) == 2 * len(variants)
    assert all(r["local"] == 0 and r["stack"] == 0 and 0 < r["reg"] <= 255 for r in rows), rows
