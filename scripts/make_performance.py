"""Render results/performance.md from the benchmarks' JSON records (results/performance/*.json).

    python scripts/make_performance.py [--records results/performance] [--out results/performance.md]

Every number in the page comes from a record. The page checks these targets against the records that can
measure them, and a target whose record is missing or ran on the wrong device says so:

- a ResNet-50 training step with mabn (and brn) at most 1.10x bn's time at the same device batch (GPU);
- grouped normalization batch n at device batch B at least 10x the img/s of a true device batch n (GPU);
- mabn's peak training memory at most 1.10x bn's (GPU; on CPU the memory saved for backward is shown);
- a true device batch of 2 under CUDA graphs at least 2x eager (GPU: bench_model's CUDA-graph rows);
- at most 4 kernel launches forward and 4 backward per layer for mabn, brn and grouped bn (GPU, the fused
  path; a record from before launches were counted says "not measured");
- the mabn layer at least 3x faster than the eager sequential baseline (GPU); on CPU its forward+backward
  at most 2x nn.BatchNorm2d's;
- folded mabn inference within 2% of folded bn (GPU); gn's inference ratio reported (it cannot fold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("layer", "model", "inference")
COMMANDS = {
    "layer": "python scripts/bench_layer.py",
    "model": "python scripts/bench_model.py",
    "inference": "python scripts/bench_inference.py",
}
COLUMNS = {
    "layer": [("shape", "shape"), ("norm", "norm"), ("n", "n"), ("ms", "fwd+bwd ms"), ("ratio", "x torch-bn"),
              ("gb_s", "GB/s at the floor"), ("of_copy", "x copy GB/s"),
              ("saved_mb", "saved for bwd MiB"), ("cuda_peak_mb", "CUDA peak MiB"),
              ("launches_fwd", "fwd launches"), ("launches_bwd", "bwd launches")],
    "model": [("norm", "norm"), ("batch", "device batch"), ("n", "n"), ("mode", "mode"), ("ms", "step ms"),
              ("img_s", "img/s"), ("ratio", "x bn time"), ("speedup", "img/s x true small batch"),
              ("graph_speedup", "img/s x eager (graph)"), ("launches", "launches/step"),
              ("saved_mb", "saved for bwd MiB"), ("cuda_peak_mb", "CUDA peak MiB")],
    "inference": [("norm", "norm"), ("folded", "folded"), ("batch", "batch"), ("ms", "ms"),
                  ("img_s", "img/s"), ("ratio", "img/s x folded bn")],
}


def load_records(folder: Path) -> dict[str, dict]:
    records = {}
    for name in BENCHMARKS:
        path = folder / f"{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
            if record.get("benchmark") != name:
                raise ValueError(f"{path}: expected a {name!r} benchmark record, "
                                 f"got {record.get('benchmark')!r}")
            records[name] = record
    return records


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# absent from the records made before launches were counted
LAUNCH_KEYS = ("launches_fwd", "launches_bwd", "launches")
NOT_MEASURED = "not measured"
BANDWIDTH_KEYS = ("gb_s", "of_copy")


def _cell(row: dict, key: str) -> str:
    """A table cell; a launch count the record never measured says so (blank: not applicable to the row)."""
    if key in LAUNCH_KEYS and key not in row:
        return NOT_MEASURED
    return _fmt(row.get(key))


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in columns) + " |" for r in rows]
    return lines


def _on_cuda(record: dict | None) -> bool:
    return bool(record and record["environment"].get("cuda"))


def _where(record: dict) -> str:
    env = record["environment"]
    return f"{env['device']}, torch {env['torch']}"


def _model_setting(record: dict) -> str:
    s = record["settings"]
    return f"{s['model']} at {s['image_size']} px, {s['dtype']}"


def _gpu_verdict(record: dict | None, ok: bool) -> str:
    """A GPU target is judged only on a CUDA record."""
    if not _on_cuda(record):
        return "open: GPU target, this record ran on CPU"
    return "met" if ok else "not met"


def targets(records: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target of the module docstring that the records can speak to."""
    layer, model, inference = (records.get(k) for k in BENCHMARKS)
    out = _model_targets(model) if model else []
    out += _graph_targets(model)
    if layer:
        out += _layer_targets(layer) + _launch_targets(layer)
    if inference:
        out += _inference_targets(inference)
    return out


def _model_targets(model: dict) -> list[tuple[str, str, str]]:
    """Training-step time against bn, grouped against true small batches, and memory against bn."""
    out = []
    rows = [r for r in model["rows"] if r["mode"] in ("grouped", "whole batch")]
    for norm in ("mabn", "brn"):
        worst = max((r for r in rows if r["norm"] == norm), key=lambda r: r["ratio"], default=None)
        if worst:
            out.append((f"ResNet-50 train step, {norm} <= 1.10x bn at the same device batch",
                        f"worst {worst['ratio']:.2f}x (device batch {worst['batch']}, n={worst['n']}); "
                        f"{_where(model)}, {_model_setting(model)}",
                        _gpu_verdict(model, worst["ratio"] <= 1.10)))
    grouped = [r for r in model["rows"] if r["norm"] == "mabn" and r.get("speedup") is not None]
    for r in grouped:
        out.append((f"grouped n={r['n']} at device batch {r['batch']} >= 10x the img/s of true device "
                    f"batch {r['n']} (mabn)", f"{r['speedup']:.1f}x; {_where(model)}",
                    _gpu_verdict(model, r["speedup"] >= 10)))
    mem_key = "cuda_peak_mb" if _on_cuda(model) else "saved_mb"
    worst = None
    for r in rows:
        if r["norm"] != "mabn":
            continue
        same = (b for b in rows if b["norm"] == "bn" and b["batch"] == r["batch"] and b["n"] == r["n"])
        bn = next(same, None)
        if bn and bn.get(mem_key) and r.get(mem_key):
            ratio = r[mem_key] / bn[mem_key]
            worst = max(worst or (ratio, r), (ratio, r), key=lambda p: p[0])
    if worst:
        what = ("CUDA peak" if mem_key == "cuda_peak_mb"
                else "memory saved for backward (CPU: no peak counter)")
        out.append(("mabn peak training memory <= 1.10x bn",
                    f"{what}: worst {worst[0]:.3f}x (device batch {worst[1]['batch']}, "
                    f"n={worst[1]['n']}); {_where(model)}", _gpu_verdict(model, worst[0] <= 1.10)))
    return out


def _graph_targets(model: dict | None) -> list[tuple[str, str, str]]:
    """A true device batch of 2 with the whole step as one CUDA graph (train.cuda_graphs) against eager."""
    target = "true device batch 2 with CUDA graphs >= 2x eager"
    rows = [r for r in (model or {}).get("rows", []) if r.get("graph_speedup") is not None and r["n"] == 2]
    if model is None:
        return [(target, f"no record: run `{COMMANDS['model']}`", "open")]
    if not rows and not _on_cuda(model):
        return [(target, f"{NOT_MEASURED}: CUDA graphs need a GPU (bench_model.py times them on CUDA only)",
                 _gpu_verdict(model, False))]
    if not rows:
        return [(target, f"{NOT_MEASURED}: this record predates the CUDA-graph rows", "open")]
    return [(f"{target} ({r['norm']})", f"{r['graph_speedup']:.2f}x ({r['ms']:.2f} ms per graphed step); "
             f"{_where(model)}", _gpu_verdict(model, r["graph_speedup"] >= 2)) for r in rows]


def _launch_targets(layer: dict) -> list[tuple[str, str, str]]:
    """At most 4 launches forward and 4 backward per layer (mabn, brn, grouped bn), judged per shape."""
    target = "<= 4 kernel launches forward + <= 4 backward per layer (mabn, brn, grouped bn)"
    # every path timed: "mabn" (impl=auto) or "mabn[fused]", "mabn[torch]", "mabn[compiled]" (--variants)
    shapes = [r for r in layer["rows"] if not r["shape"].endswith(")") and _base(r["norm"]) in ("mabn", "brn", "bn")]
    shapes = [r for r in shapes if _base(r["norm"]) != "bn" or r["n"] < layer["settings"]["batch"]]
    if not any("launches_fwd" in r for r in shapes):
        return [(target, f"{NOT_MEASURED}: this record predates launch counting; rerun "
                         f"`{COMMANDS['layer']}`", "open")]
    out = []
    for norm in dict.fromkeys(r["norm"] for r in sorted(shapes, key=lambda r: ("mabn", "brn", "bn").index(
            _base(r["norm"])))):
        if norm.endswith("[compiled]"):
            continue  # inductor's own kernels: the launch target is the hand-written paths'
        mine = [r for r in shapes if r["norm"] == norm]
        if mine:
            fwd, bwd = max(r["launches_fwd"] for r in mine), max(r["launches_bwd"] for r in mine)
            what = "grouped " + norm if _base(norm) == "bn" else norm
            out.append((f"{target}: {what}", f"worst shape {fwd} forward + {bwd} backward; {_where(layer)}",
                        _gpu_verdict(layer, fwd <= 4 and bwd <= 4)))
    return out


def _base(label: str) -> str:
    """The norm of a layer row's label: mabn for "mabn" and "mabn[fused]"."""
    return label.split("[")[0]


def _layer_targets(layer: dict) -> list[tuple[str, str, str]]:
    """The mabn layer against the eager sequential baseline (GPU) and against nn.BatchNorm2d (CPU)."""
    out = []
    totals = [r for r in layer["rows"] if r["shape"].endswith(")")]
    for r in (r for r in totals if _base(r["norm"]) == "mabn"):
        naive = next((x for x in totals if x["norm"] == "naive-mabn" and x["n"] == r["n"]), None)
        if naive:
            speed = naive["ms"] / r["ms"]
            out.append((f"{r['norm']} layer >= 3x faster than the eager sequential baseline (n={r['n']})",
                        f"{speed:.1f}x over {r['shape']}; {_where(layer)}",
                        _gpu_verdict(layer, speed >= 3)))
    if not _on_cuda(layer):
        shapes = [r for r in layer["rows"] if r["norm"] == "mabn" and not r["shape"].endswith(")")]
        for r in (r for r in totals if r["norm"] == "mabn"):
            worst = max((s for s in shapes if s["n"] == r["n"]), key=lambda s: s["ratio"])
            out.append((f"CPU: mabn layer forward+backward <= 2x nn.BatchNorm2d (n={r['n']})",
                        f"{r['ratio']:.2f}x over {r['shape']}, worst single shape {worst['shape']} "
                        f"{worst['ratio']:.2f}x; "
                        f"{_where(layer)}", "met" if max(r["ratio"], worst["ratio"]) <= 2 else "not met"))
    shapes = [r for r in layer["rows"] if "of_copy" in r and not r["shape"].endswith(")")]
    for label in dict.fromkeys(r["norm"] for r in shapes if _base(r["norm"]) in ("mabn", "torch-bn")):
        for n in sorted({r["n"] for r in shapes if r["norm"] == label}):
            mine = [r for r in shapes if r["norm"] == label and r["n"] == n]
            big = max(mine, key=lambda r: r["gb_s"] / r["of_copy"] * r["ms"])  # the largest tensor
            out.append((f"memory floor reached by {label} forward+backward (n={n}; reported)",
                        f"{min(r['of_copy'] for r in mine):.0%}-{max(r['of_copy'] for r in mine):.0%} of a copy's "
                        f"bandwidth at 5 passes over x across shapes, {big['of_copy']:.0%} at {big['shape']} "
                        f"({big['gb_s']:.0f} GB/s); {_where(layer)}", "reported"))
    return out


def _inference_targets(inference: dict) -> list[tuple[str, str, str]]:
    """Folded mabn against folded bn; gn's ratio, reported only."""
    out = []
    for r in inference["rows"]:
        if r["norm"] == "mabn" and r["folded"]:
            out.append((f"folded mabn inference = folded bn +- 2% (batch {r['batch']})",
                        f"{r['ratio']:.3f}x; {_where(inference)}",
                        _gpu_verdict(inference, abs(r["ratio"] - 1) <= 0.02)))
        if r["norm"] == "gn":
            out.append((f"report gn's inference ratio (batch {r['batch']})",
                        f"{r['ratio']:.3f}x folded bn's img/s; {_where(inference)}", "reported"))
    return out


def render(records: dict[str, dict]) -> str:
    records = dict(records)
    kernels = records.pop("kernels", None)
    lines = ["# Performance", "",
             "Generated by `python scripts/make_performance.py` from the benchmark records in "
             "`results/performance/*.json`; do not edit by hand. "
             "Regenerate with `make bench` (see README).", ""]
    if not records:
        lines += ["No benchmark records yet.", ""]
        return "\n".join(lines + _kernel_section(kernels))
    lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(records)]
    lines.append("")
    for name in BENCHMARKS:
        record = records.get(name)
        lines += [f"## {name.capitalize()} benchmark", ""]
        if record is None:
            lines += [f"No record: run `{COMMANDS[name]}`.", ""]
            continue
        env, settings = record["environment"], record["settings"]
        lines += [f"- command: `{env['command']}`",
                  f"- device: {env['device']}; torch {env['torch']}"
                  + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
                  + f"; Python {env['python']}; {env['threads']} threads",
                  f"- commit {env['git_sha']}, {env['time']}",
                  "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
                  "- times are medians over the repeats; "
                  "ratios are to the baseline timed in the same run", ""]
        # the bandwidth columns only where the record measured them (records from before the copy rows)
        columns = [(k, h) for k, h in COLUMNS[name] if k not in BANDWIDTH_KEYS
                   or any(k in r for r in record["rows"])]
        lines += _table(record["rows"], columns)
        lines.append("")
    return "\n".join(lines + _kernel_section(kernels))


def load_kernels(folder: Path) -> dict | None:
    """results/performance/kernels.json: the ahead-of-time compile of every fused kernel variant, if recorded."""
    path = folder / "kernels.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("benchmark") != "kernels":
        raise ValueError(f"{path}: expected a 'kernels' record, got {record.get('benchmark')!r}")
    return record


def _kernel_section(record: dict | None) -> list[str]:
    """Registers, spills and shared memory of each fused kernel, per architecture, over its variants."""
    if record is None:
        return []
    env, settings = record["environment"], record["settings"]
    lines = ["## Fused kernels compiled for real GPUs (no GPU involved)", "",
             "Every variant the layers launch (kernel, dtypes, constexprs: captured from real launches under the "
             "interpreter, `python -m mabn.norms._aot capture`) compiled ahead of time with the triton wheel's "
             "ptxas and read with its cuobjdump (`python -m mabn.norms._aot compile --record "
             "results/performance/kernels.json`). What it means: each kernel compiles for these architectures, "
             "with these resources per thread; no variant spills to local memory (a spill fails the compile "
             "test, `tests/test_fused_aot.py`). What it does not mean: nothing here ran on a GPU, so neither "
             "speed nor occupancy is measured, and ptxas of another CUDA version may allocate differently.", "",
             f"- triton {settings['triton']}, {settings['variants']} variants, {', '.join(settings['arch'])}; "
             f"commit {env['git_sha']}, {env['time']}", "",
             "| kernel | arch | variants | registers / thread | stack bytes | local bytes (spills) | "
             "shared bytes | warps |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in record["rows"]:
        groups.setdefault((row["kernel"], row["arch"]), []).append(row)

    def span(rows, key):
        lo, hi = min(r.get(key, 0) for r in rows), max(r.get(key, 0) for r in rows)
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    for (kernel, arch), rows in sorted(groups.items()):
        lines.append(f"| {kernel} | {arch} | {len(rows)} | {span(rows, 'reg')} | {span(rows, 'stack')} | "
                     f"{span(rows, 'local')} | {span(rows, 'shared')} | {span(rows, 'num_warps')} |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", default=str(ROOT / "results/performance"))
    p.add_argument("--out", default=str(ROOT / "results/performance.md"))
    args = p.parse_args(argv)
    records = load_records(Path(args.records))
    kernels = load_kernels(Path(args.records))
    Path(args.out).write_text(render({**records, **({"kernels": kernels} if kernels else {})}))
    print(f"wrote {args.out} from {len(records)} record(s): {', '.join(records) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
