"""The base package is the norm library with torch as its only dependency: a wheel built from this checkout,
installed alone into a fresh venv that holds torch (and what torch itself needs) and nothing else, imports and
works — layers, registry, convert/revert, folding, PreciseBN — and the training stack is not there.

torch comes into the fresh venv as links to this environment's installed distributions (code and dist-info:
what pip sees as installed), not by a download: the test needs no network and no 5 GB copy."""

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker

import mabn

ROOT = Path(__file__).resolve().parents[1]

USE = """
import sys, torch
from torch import nn
import mabn
from mabn.fold import fold_norms
from mabn.norms import NormContext, build_norm, convert_norms, registered_norms, revert_norms
from mabn.precise_bn import recompute_norm_stats
ctx = NormContext(norm_batch=2, device_batch=8)
x = torch.randn(8, 3, 8, 8)
for name in registered_norms():
    recipe = build_norm(name, NormContext(device_batch=8) if name == "syncbn" else ctx)
    net = recipe.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), recipe.ctor(4)))
    net(x).sum().backward()
model = convert_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), "mabn", ctx)
model(x)
recompute_norm_stats(model, [(x, None)], torch.device("cpu"), batch_size=4)
folded = fold_norms(model.eval())
torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
assert revert_norms(model) is model and type(model[1]) is nn.BatchNorm2d
for absent in ("hydra", "omegaconf", "torchvision", "matplotlib", "wandb", "timm", "detectron2", "numpy"):
    try:
        __import__(absent)
    except ImportError:
        continue
    raise AssertionError(absent + " is importable in the base venv")
print("base install works:", mabn.__version__, torch.__version__)
"""


def _requirements(dist: str, seen: set[str]) -> set[str]:
    """``dist`` and what it needs here (markers evaluated, extras not followed), recursively."""
    seen.add(dist.lower())
    for req in md.distribution(dist).requires or []:
        spec, _, marker = req.partition(";")
        if marker and ("extra" in marker or not Marker(marker).evaluate()):
            continue
        name = re.split(r"[ <>=!~\[(]", spec.strip())[0]
        if name.lower() not in seen:
            _requirements(name, seen)
    return seen


def _link_distributions(names: set[str], site: Path) -> None:
    """Symlink each distribution's top-level files and dist-info from this environment into ``site``."""
    for name in names:
        dist = md.distribution(name)
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src, dst = base / top, site / top
            if src.exists() and not dst.exists() and top != "..":
                dst.symlink_to(src)


def test_pyproject_version_is_the_package_version():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(mabn.__version__)}"$', text, flags=re.M)
    assert f"## {mabn.__version__} " in (ROOT / "CHANGELOG.md").read_text()
    assert f"version: {mabn.__version__}" in (ROOT / "CITATION.cff").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text() and 'license = { text = "Apache-2.0" }' in text


@pytest.mark.slow
def test_the_base_wheel_installs_alone_and_works(tmp_path):
    wheels, src = tmp_path / "wheels", tmp_path / "src"  # built from a copy: setuptools writes build/ in-tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", ".cache", "results", "tests", "runs",
                                                             "*.egg-info", "__pycache__", "outputs", "multirun"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, timeout=300, cwd=tmp_path)
    [wheel] = wheels.glob("mabn-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    required = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in required if "extra ==" not in r] == ["torch>=2.11"], required
    assert any("extra == \"train\"" in r for r in required) and any("extra == \"detection\"" in r for r in required)

    venv = tmp_path / "venv"
    # no pip or setuptools of its own: this environment's pip installs into it (pip --python), and torch's
    # setuptools comes linked like the rest of what torch needs
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    _link_distributions(_requirements("torch", set()), site)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1")
    pip = [sys.executable, "-m", "pip", "--python", str(py)]
    subprocess.run([*pip, "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300, env=env)
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, env=env, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr  # torch is all the base package requires
    out = subprocess.run([str(py), "-c", USE], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"base install works: {mabn.__version__}" in out.stdout
