"""What the benchmarks (scripts/bench_*.py) share: timing, memory, the environment line, their JSON records.

A benchmark times every candidate and its baseline in the same process, one after another, and reports
medians of several repeats and ratios to the baseline; results/performance.md is rendered from the JSON
records by scripts/make_performance.py, never typed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .records import PROJECT_ROOT, git_sha, hardware, write_json_atomic


def pick_device(name: str) -> torch.device:
    """``auto`` (cuda when available), ``cpu`` or ``cuda``; ValueError for anything else or absent CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (the targets' setting), float32 on CPU."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"--dtype must be auto or one of {sorted(table)}, got {name!r}")
    return table[name]


def environment(device: torch.device) -> dict:
    """The facts a reader needs to trust a number: device, versions, threads, commit, time, command."""
    return {
        "device": hardware(device),
        "torch": torch.__version__,
        "mabn_version": __version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_sha": git_sha(),
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", *sys.argv]),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int) -> dict:
    """Median (and min, max) wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats}


def saved_for_backward_mb(fn: Callable[[], object]) -> float:
    """MiB of tensors autograd keeps for the backward of what ``fn()`` builds (storages counted once).

    The part of training memory a norm layer controls, measured the same way on every device.
    """
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.type)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def cuda_peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def write_record(path: Path | str, benchmark: str, device: torch.device, settings: dict,
                 rows: list[dict]) -> Path:
    """Write one benchmark's JSON record (what make_performance.py renders) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": benchmark, "environment": environment(device), "settings": settings, "rows": rows}
    write_json_atomic(record, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain aligned table on stdout (what the benchmark printed is what its record holds)."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (e.g. ``32,64``)."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def channels_last_for(setting: str, device: torch.device) -> bool:
    """``auto``: channels_last on CUDA (the targets' setting), NCHW on CPU."""
    return device.type == "cuda" if setting == "auto" else setting == "true"


def parser(doc: str, name: str, *, repeats: int, warmup: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: device, dtype, memory format, repeats, warm-up, record path."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16")
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--out", default=str(PROJECT_ROOT / "results" / "performance" / f"{name}.json"))
    return p


def run_and_record(p: argparse.ArgumentParser, args, name: str, run: Callable, *, settings: list[str],
                   columns: list[str]) -> int:
    """Run a benchmark (a bad setting is reported by the parser, no traceback), print and record its rows."""
    try:
        device = pick_device(args.device)
        rows = run(args)
    except ValueError as err:
        p.error(str(err))
    recorded = {k: getattr(args, k) for k in settings}
    recorded["dtype"] = str(pick_dtype(args.dtype, device)).replace("torch.", "")
    recorded["channels_last"] = channels_last_for(args.channels_last, device)
    path = write_record(args.out, name, device, recorded, rows)
    print_table(rows, columns)
    print(f"record: {path}")
    return 0
