#!/usr/bin/env python
"""Plot the batch-statistics noise of runs traced with diag.batch_stats=true (the MABN paper's analysis).

    python scripts/plot_batch_stats.py runs/fmnist-*/ --out results/diagnostics

Reads each run's diag_batch_stats.jsonl and its Hydra config (norm, normalization batch). Writes
batch_stats.json (the median deviation of each statistic per run and layer) and two figures (PNG + SVG):
batch_stats_vs_n (median over traced steps and layers, against the normalization batch, one line per norm)
and batch_stats_by_layer_<norm> (per layer, one line per normalization batch). Where a trace also holds
what MABN normalizes with (chi2_bar_dev, psi_bar_dev: the moving averages χ̄², Ψ̄), they are drawn dashed
beside the batch statistics' noise, in the σ²_B and Ψ_B panels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from mabn.checkpoint import upgrade_config
from mabn.results import save_figure

STATS = {"mu_dev": "forward: mean μ_B", "var_dev": "forward: variance σ²_B", "g_dev": "backward: g_B",
         "psi_dev": "backward: Ψ_B"}
# what MABN uses instead of a batch statistic -> the panel of that statistic, and the legend's words
USED = {"chi2_bar_dev": ("var_dev", "used χ̄²"), "psi_bar_dev": ("psi_dev", "used Ψ̄")}


def load_run(run_dir: Path) -> dict:
    trace = run_dir / "diag_batch_stats.jsonl"
    config = run_dir / "hydra" / "config.yaml"
    if not trace.is_file() or not config.is_file():
        raise FileNotFoundError(f"{run_dir} has no diag_batch_stats.jsonl and hydra/config.yaml (train with "
                                f"diag.batch_stats=true)")
    cfg = upgrade_config(OmegaConf.to_container(OmegaConf.load(config)))  # runs of either config layout
    per_layer: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in trace.read_text().splitlines():
        rec = json.loads(line)
        for key in (*STATS, *(k for k in USED if k in rec)):
            per_layer[(rec["depth"], rec["layer"])][key].append(rec[key])
    layers = [{"depth": d, "layer": name, **{k: statistics.median(v) for k, v in vals.items()}}
              for (d, name), vals in sorted(per_layer.items())]
    used = [k for k in USED if layers and all(k in layer for layer in layers)]
    return {"run": str(run_dir), "norm": str(cfg["norm"]["name"]), "model": str(cfg["model"]["name"]),
            "n": int(cfg["batch"]), "seed": int(cfg["seed"]), "layers": layers,
            **{k: statistics.median(layer[k] for layer in layers) for k in (*STATS, *used)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=Path("results/diagnostics"))
    args = parser.parse_args(argv)
    try:
        runs = [load_run(r) for r in args.runs]
    except FileNotFoundError as err:
        parser.error(str(err))
    several_models = len({r["model"] for r in runs}) > 1  # e.g. XBNBlock beside plain ResNets: own curves
    for r in runs:
        r["series"] = f"{r['norm']} {r['model']}" if several_models else r["norm"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_stats.json").write_text(json.dumps(runs, indent=1) + "\n")
    plot(runs, args.out)
    for r in sorted(runs, key=lambda r: (r["series"], r["n"])):
        shown = [k for k in (*STATS, *USED) if k in r]
        print(f"{r['series']:>6} n={r['n']:<3} " + "  ".join(f"{k} {r[k]:.4f}" for k in shown))
    return 0


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for series in sorted({r["series"] for r in runs}):
        mine = sorted((r for r in runs if r["series"] == series), key=lambda r: r["n"])
        for ax, key in zip(axes, STATS, strict=True):
            line, = ax.plot([r["n"] for r in mine], [r[key] for r in mine], marker="o", label=series)
            _plot_used(ax, key, [(r["n"], r) for r in mine], f"{series}: ", color=line.get_color())
    ns = sorted({r["n"] for r in runs})
    for ax, (key, title) in zip(axes, STATS.items(), strict=True):
        ax.set(title=title, xlabel="normalization batch n", yscale="log", ylabel=key)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])  # label the batches run, not log-scale minor ticks
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3)
    axes[0].legend()
    _legend_used(axes)
    fig.suptitle("Deviation of the batch statistics from their population values (median over steps, layers)")
    fig.tight_layout()
    _save(fig, out / "batch_stats_vs_n")
    for series in sorted({r["series"] for r in runs}):
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for r in sorted((r for r in runs if r["series"] == series), key=lambda r: r["n"]):
            for ax, key in zip(axes, STATS, strict=True):
                line, = ax.plot([x["depth"] for x in r["layers"]], [x[key] for x in r["layers"]], marker=".",
                                label=f"n={r['n']}")
                _plot_used(ax, key, [(x["depth"], x) for x in r["layers"]], f"n={r['n']}: ",
                           color=line.get_color())
        for ax, (key, title) in zip(axes, STATS.items(), strict=True):
            ax.set(title=title, xlabel="norm layer (depth)", yscale="log", ylabel=key)
            ax.grid(alpha=0.3)
        axes[0].legend()
        _legend_used(axes)
        fig.suptitle(f"{series}: batch-statistics deviation per layer")
        fig.tight_layout()
        _save(fig, out / f"batch_stats_by_layer_{series.replace(' ', '_')}")


def _plot_used(ax, key: str, points: list[tuple[int, dict]], prefix: str, color) -> None:
    """Dashed, in the panel of batch statistic ``key``: what MABN used in its place, where recorded."""
    for used, (panel, words) in USED.items():
        pts = [(x, row[used]) for x, row in points if used in row]
        if panel == key and pts:
            ax.plot(*zip(*pts, strict=True), marker="x", linestyle="--", color=color, label=prefix + words)


def _legend_used(axes) -> None:
    """A legend in each panel that shows a used statistic beside its batch statistic."""
    for ax in axes[1:]:
        if any(label.endswith(tuple(w for _, w in USED.values())) for label in ax.get_legend_handles_labels()[1]):
            ax.legend(fontsize=7)


def _save(fig, stem: Path) -> None:
    import matplotlib.pyplot as plt

    save_figure(fig, stem)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
