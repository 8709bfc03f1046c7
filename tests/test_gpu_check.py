"""The prepared GPU check (scripts/gpu_check.sh): its steps, its time budget, and that what it runs imports
nothing a bare CUDA machine lacks beyond the carried wheels (scripts/gpu_wheels.sh)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["wheels", "gpu-tests", "bench-layer", "bench-model", "bench-inference", "performance-page"]
# on the CUDA machine neither installed nor carried (KINDS.md): the check's code paths must not import them
ABSENT = ("detectron2", "wandb", "submitit", "pycocotools", "fvcore")


def _dry_run() -> list[tuple[str, int, str]]:
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    steps = re.findall(r"^  (\S+) +(\d+)s  (.+)$", out.stdout, flags=re.M)
    return [(name, int(limit), cmd) for name, limit, cmd in steps]


def test_dry_run_lists_the_steps_in_order_within_8_minutes():
    steps = _dry_run()
    assert [name for name, _, _ in steps] == STEPS
    commands = {name: cmd for name, _, cmd in steps}
    assert "pip install" in commands["wheels"] and "--no-index" in commands["wheels"] \
        and commands["wheels"].endswith(".whl/*.whl")
    assert "-m pytest -m gpu" in commands["gpu-tests"] and "grep -l 'mark.gpu'" in commands["gpu-tests"]
    for name in ("bench-layer", "bench-model", "bench-inference"):
        script = name.replace("-", "_")
        assert f"scripts/{script}.py --device cuda" in commands[name]
    assert commands["performance-page"].endswith("scripts/make_performance.py")
    # each norm shape and the whole step on every path (defaults: bf16 + channels_last on CUDA, batch 32, n 2/32)
    assert "--variants fused,torch,compiled" in commands["bench-layer"]
    assert all(f"mabn[{path}]" in commands["bench-model"] for path in ("fused", "torch", "compiled"))
    assert "--norms 'bn," in commands["bench-model"]  # quoted against the shell's globbing; bn the baseline
    assert sum(limit for _, limit, _ in steps) <= 450  # + start-up: the whole check within 8 minutes


def test_wheels_are_pinned_and_ignored():
    """The wheels script fetches the constraints' versions into .whl/, which git ignores."""
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()
    script = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    pins = (ROOT / "requirements" / "constraints.txt").read_text()
    for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime"):
        assert name in script and re.search(rf"^{name}==", pins, flags=re.M), name
    assert "gpu-check:" in (ROOT / "Makefile").read_text()


def test_gpu_check_code_paths_import_only_what_the_cuda_machine_has():
    """Import every module the check runs with the absent packages blocked: the GPU-marked test files, the
    benchmark scripts and the training entry script (hydra and omegaconf come as carried wheels)."""
    gpu_tests = sorted(p.stem for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    assert {"test_graphs", "test_integrations"} <= set(gpu_tests)
    code = f"""
import importlib, importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
for module in {[f"tests.{t}" for t in gpu_tests]!r}:
    importlib.import_module(module)
for path in ["scripts/bench_layer.py", "scripts/bench_model.py", "scripts/bench_inference.py",
             "scripts/make_performance.py", "train_imagenet.py"]:
    spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[-1][:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print("imported")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]
