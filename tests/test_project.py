"""Project-level contracts: configs mirror the registry, the README's commands are what CI runs, data reader."""

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mabn.data import FashionMNIST, read_idx
from mabn.norms import build_norm, norm_defaults, registered_norms

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", registered_norms())
def test_norm_config_mirrors_registry(name):
    path = ROOT / "configs" / "norm" / f"{name}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg.pop("name") == name
    assert cfg == norm_defaults(name), f"{path} and the registry defaults disagree"
    build_norm({"name": name, **cfg})


def test_no_function_of_the_package_or_entry_scripts_is_longer_than_60_lines():
    """Orchestration stays readable: a longer function is a sign that one concern grew into another's."""
    import ast

    long = []
    for path in [*sorted((ROOT / "mabn").rglob("*.py")), ROOT / "train_imagenet.py", ROOT / "train_coco.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```[\w-]*\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"], "README must open with the two set-up commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M), ".ci/run must run the README's test command verbatim"


def _write_idx(path, array, gz=True):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype.type], array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.tobytes())


def test_fashion_mnist_reader_on_generated_idx(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz=False)
    ds = FashionMNIST(tmp_path, split="test")
    assert len(ds) == 5
    image, label = ds[3]
    assert image.shape == (1, 28, 28) and (image.numpy()[0] == images[3]).all() and label == labels[3]


def test_fashion_mnist_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path, split="train")
    with pytest.raises(ValueError, match="split must be one of"):
        FashionMNIST(tmp_path, split="val")
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(ValueError, match=r"bad-idx: IDX header says shape \(5,\)"):
        read_idx(bad)


def test_installed_environment_is_current():
    """The running environment was made by scripts/install.sh from the current inputs (so a rerun is a no-op)."""
    import os
    import subprocess
    import sys

    if not list(Path(sys.prefix).glob(".mabn-installed-*")):
        pytest.skip(f"{sys.prefix} was not made by scripts/install.sh")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--check"], capture_output=True, text=True,
                         env={**os.environ, "MABN_VENV": sys.prefix}, timeout=60)
    assert out.returncode == 0 and "up to date" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_selfcheck_contract_on_generated_images(name):
    import torch

    from mabn.norms import NormContext
    from mabn.selfcheck import grouped_contract_error, small_net

    model = small_net(build_norm(name, NormContext(norm_batch=2, device_batch=8)).ctor)
    assert grouped_contract_error(model, torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,)), 2) < 1e-9
