"""results/ tables and plots generated from run records (summary.json + metrics.jsonl); no hand-typed number.

A record is a run directory holding ``summary.json`` (written by the entry scripts) and usually
``metrics.jsonl``. Records live in ``results/records/<table>/<run>/``: the folder name is the table they
belong to. Every cell is one norm x normalization batch, aggregated over seeds (mean, sample std, count).
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mabn.norms.registry import norm_variant
from mabn.papers import Reported, reported_for
from mabn.records import check_protocol
from mabn.statistics_table import is_statistics_table
from mabn.statistics_table import render as render_statistics

# The metrics a table shows, per task: (summary key, header, lower is better). Classification tables show
# top-1 *error*, the papers' axis; a record holds top-1 accuracy and the error is 100 - it.
METRICS = {"classification": [("top1_err", "top-1 err (%)", True)],
           "detection": [("bbox_AP", "box AP", False), ("segm_AP", "mask AP", False)]}
NORM_ORDER = ["bn", "syncbn", "gn", "brn", "mabn", "frozenbn"]


@dataclass
class Cell:
    """All records of one norm at one normalization batch (the seeds of a results-table cell)."""

    norm: str
    n: int
    runs: list = field(default_factory=list)
    label: str = ""     # the row's name: the norm, or "norm (model)" when a table spans several models

    @property
    def finished(self) -> list:
        return [r for r in self.runs if r.get("status", "finished") == "finished"]

    @property
    def diverged(self) -> list:
        return [r for r in self.runs if r.get("status") == "diverged"]

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.finished if r.get(key) is not None]


# Tables that split one norm's rows by settings that are not ablation switches: {table: {norm: keys}}
ROW_KEYS = {"fmnist_brn_schedule": {"brn": ("schedule_ref_iters", "r_max", "d_max")}}

# Tables that train another table's cells for longer, the same protocol otherwise: {table: the shorter table}
LONGER_OF = {"fmnist_long": "fmnist"}

# The gaps a longer table watches (a@n_a − b@n_b): the paper's claims' (BN's small-batch loss, MABN against BN at
# its normal batch, BRN against BN at the small batch) and MABN's edge over BN at the normal batch
CLAIM_GAPS = (("bn", 2, "bn", 32), ("mabn", 2, "bn", 32), ("brn", 2, "bn", 2), ("mabn", 32, "bn", 32))

# The keys a record cannot be placed in a table without: its row and its column.
REQUIRED = ("norm", "norm_batch")


def read_summary(path: Path) -> dict:
    """A summary.json as a dict; a ValueError that names the file says what is wrong with it."""
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(summary).__name__}")
    return summary


def load_record(run_dir: Path) -> dict:
    """summary.json of a run, with the derived top-1 error and where it came from."""
    path = run_dir / "summary.json"
    summary = read_summary(path)
    missing = [key for key in REQUIRED if summary.get(key) is None]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (every record needs {', '.join(REQUIRED)})")
    try:
        int(summary["norm_batch"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: norm_batch {summary['norm_batch']!r} is not an integer") from err
    if summary.get("top1") is not None:
        if not isinstance(summary["top1"], (int, float)):
            raise ValueError(f"{path}: top1 {summary['top1']!r} is not a number")
        summary["top1_err"] = round(100.0 - summary["top1"], 4)
    # an ablation's non-default switches (e.g. "backward_stat=batch"), "" for the published method
    summary["variant"] = norm_variant(str(summary["norm"]), summary.get("norm_params"))
    summary["record_dir"] = str(run_dir)
    return summary


def load_tables(records_root: Path) -> dict[str, list[dict]]:
    """{table: [record, ...]} for every records_root/<table>/**/summary.json."""
    tables: dict[str, list[dict]] = defaultdict(list)
    bad = []
    for path in sorted(records_root.glob("*/**/summary.json")):
        table = path.relative_to(records_root).parts[0]
        try:
            record = load_record(path.parent)
            keys = ROW_KEYS.get(table, {}).get(record["norm"], ())
            params = record.get("norm_params") or {}
            shown = [f"{k}={'null' if params.get(k) is None else params[k]}" for k in keys]
            record["variant"] = ", ".join(filter(None, [record["variant"], *shown]))
            tables[table].append(record)
        except ValueError as err:
            bad.append(str(err))
    if bad:  # all of them at once: a sweep's broken records are fixed in one pass, not one per rerun
        raise ValueError(f"{len(bad)} bad record(s):\n  " + "\n  ".join(bad))
    return dict(tables)


def collect(run_dirs: list[Path], records_root: Path, table: str | None = None) -> list[Path]:
    """Copy the record files of finished (or diverged) runs into records_root/<table>/<run name>/.

    The table is ``table`` or the run's experiment (recorded in summary.json). Checkpoints and wandb files
    stay behind: the record is summary.json, metrics.jsonl and the resolved config."""
    written = []
    for run_dir in run_dirs:
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            continue  # unfinished: nothing to record yet
        name = table or read_summary(summary_path).get("experiment")
        if not name:
            raise ValueError(f"{run_dir}/summary.json names no experiment; pass the table name (--table)")
        dest = records_root / name / run_dir.name
        dest.mkdir(parents=True, exist_ok=True)
        for src, dst in (("summary.json", "summary.json"), ("metrics.jsonl", "metrics.jsonl"),
                         ("hydra/config.yaml", "config.yaml")):
            if (run_dir / src).is_file():
                shutil.copy2(run_dir / src, dest / dst)
        written.append(dest)
    return written


def row_label(rec: dict, several_models: bool) -> str:
    """A record's row: the norm, its variant's switches in brackets, and the model when there are several."""
    label = f"{rec['norm']} [{rec['variant']}]" if rec.get("variant") else rec["norm"]
    return f"{label} ({rec.get('model')})" if several_models else label


def cells(records: list[dict]) -> list[Cell]:
    """Records grouped by (norm, normalization batch) — and variant (an ablation's switches) and model,
    when the table holds several (XBNBlock beside plain ResNets is another setting, not another seed) — in
    the papers' norm order, increasing n."""
    several_models = len({rec.get("model") for rec in records}) > 1
    by_key: dict[tuple[str, int], Cell] = {}
    for rec in records:
        label = row_label(rec, several_models)
        n = int(rec["norm_batch"])
        by_key.setdefault((label, n), Cell(rec["norm"], n, label=label)).runs.append(rec)
    order = {name: i for i, name in enumerate(NORM_ORDER)}
    return sorted(by_key.values(), key=lambda c: (order.get(c.norm, len(order)), c.label, c.n))


def by_cell(grid: list[Cell]) -> dict[tuple[str, int], Cell]:
    """A table's cells by (row label, n)."""
    return {(c.label, c.n): c for c in grid}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single run)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(cell: Cell, key: str) -> str:
    values = cell.values(key)
    diverged = len(cell.diverged)
    if not values:
        return f"diverged ({diverged}/{len(cell.runs)})" if diverged else "–"
    mean, std = mean_std(values)
    text = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
    text += f" ({len(values)})"
    if diverged:
        text += f", {diverged} diverged"
    return text


def _task(records: list[dict]) -> str:
    tasks = {r.get("task", "classification") for r in records}
    if len(tasks) != 1:
        raise ValueError(f"a table holds one task; these records mix {sorted(tasks)}")
    return tasks.pop()


def _provenance(records: list[dict]) -> list[str]:
    """Hardware, commits, software, dates and commands of a table's records."""
    def counted(key):
        counts = Counter(key(r) if callable(key) else str(r.get(key)) for r in records)
        return ", ".join(f"{value} ({count})" for value, count in counts.most_common())

    finished = sorted(r["finished"] for r in records if r.get("finished"))
    hours = sum(r.get("wall_time_s") or 0 for r in records) / 3600
    lines = [f"- hardware (runs): {counted('device')}",
             f"- commit (runs): {counted(_commits)}",
             f"- torch (runs): {counted('torch')}"]
    if finished:
        lines.append(f"- finished between {finished[0]} and {finished[-1]}; {hours:.1f} h of training in all")
    examples = Counter(r.get("command") for r in records if r.get("command"))
    for command, count in sorted(examples.items())[:6]:
        lines.append(f"- `python {command}`" + (f" ({count} runs)" if count > 1 else ""))
    if len(examples) > 6:
        lines.append(f"- ... and {len(examples) - 6} more commands "
                     "(each record's summary.json holds its own)")
    return lines


def _commits(record: dict) -> str:
    """The commit a record's run trained on; a run resumed on other code, each of its starts' in order."""
    trained = [s for s in record.get("starts") or [] if s.get("trained", True)]  # a start that never stepped: no
    shas = list(dict.fromkeys(start.get("git_sha") or "unrecorded" for start in trained))
    return " then ".join(shas) if len(shas) > 1 else str(record.get("git_sha"))


def _settings(records: list[dict]) -> str:
    def values(key):
        return "/".join(sorted({str(r.get(key)) for r in records}))

    length = f"epochs {values('epochs')}" if records[0].get("epochs") else f"iterations {values('iters')}"
    return (f"data {values('data')}, model {values('model')}, device batch {values('device_batch')}, "
            f"{values('world_size')} process(es), SGD batch {values('sgd_batch')}, {length}, "
            f"seeds {values('seed')}")


def _spread(cell: Cell, key: str) -> tuple[float, float] | None:
    values = cell.values(key)
    if len(values) < 2:
        return None
    mean, std = mean_std(values)
    return mean, std


def claims(grid: list[Cell], key: str = "top1_err", small: int = 2, large: int = 32) -> list[str]:
    """The MABN paper's qualitative ImageNet claims checked on a classification table's records.

    "Beyond the seed spread" means the two means differ by more than the sum of the two cells' sample
    standard deviations (a deliberately plain criterion for a handful of seeds). A claim whose cells are
    missing is left out; one whose cells hold fewer than two finished seeds says so (a sweep under way)."""
    by = by_cell(grid)
    stats = {k: _spread(c, key) for k, c in by.items()}

    def fmt(name, n, st):
        return f"{name}@{n} {st[0]:.2f} ± {st[1]:.2f}"

    def bn_worse(bn_s, bn_l):
        gap, spread = _versus(bn_s, bn_l)
        return ("yes" if gap > spread else "no",
                f"{fmt('bn', small, bn_s)} vs {fmt('bn', large, bn_l)}: gap {gap:+.2f}, spread {spread:.2f}.")

    def mabn_near(mabn_s, bn_l):
        gap, spread = _versus(mabn_s, bn_l)
        return ("yes" if abs(gap) <= spread else ("no (better)" if gap < 0 else "no (worse)"),
                f"{fmt('mabn', small, mabn_s)} vs {fmt('bn', large, bn_l)}: gap {gap:+.2f}, spread {spread:.2f}.")

    def brn_between(brn_s, bn_s, mabn_s):
        lo, hi = sorted((bn_s[0], mabn_s[0]))
        return ("yes" if lo < brn_s[0] < hi else "no",
                f"{fmt('brn', small, brn_s)}; bn {bn_s[0]:.2f}, mabn {mabn_s[0]:.2f}.")

    checks = [(f"BN@{small} worse than BN@{large} beyond the seed spread", [("bn", small), ("bn", large)], bn_worse),
              (f"MABN@{small} within the seed spread of BN@{large}", [("mabn", small), ("bn", large)], mabn_near),
              (f"BRN@{small} between BN@{small} and MABN@{small} (means)",
               [("brn", small), ("bn", small), ("mabn", small)], brn_between)]
    out = []
    for claim, needed, judge in checks:
        if not all(k in by for k in needed):
            continue
        if not all(stats[k] for k in needed):
            counts = ", ".join(f"{name}@{n} {len(by[(name, n)].values(key))}" for name, n in needed)
            out.append(f"- {claim}: **not checked** — needs two finished seeds in each of its cells; "
                       f"finished: {counts}.")
            continue
        verdict, detail = judge(*(stats[k] for k in needed))
        out.append(f"- {claim}: **{verdict}** — {detail}")
    return out


def _versus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Gap of the means (a − b) and the seed spread (sum of the sample stds)."""
    return a[0] - b[0], a[1] + b[1]


def _worse(gap: float, spread: float) -> str:
    return "yes" if gap > spread else ("no (better beyond the spread)" if -gap > spread else "no")


def _better(gap: float, spread: float) -> str:
    """The verdict of "better beyond the seed spread" for an error gap (other − this)."""
    return "yes" if gap > spread else ("no (worse beyond the spread)" if -gap > spread else "no")


def ablation_claims(grid: list[Cell], key: str = "top1_err", large: int = 32) -> list[str]:
    """What each MABN switch does, checked on an ablation table's records (lower ``key`` is better).

    For every ablated row ("mabn [switch=value]") at every n: is it worse than mabn at that n beyond the
    seed spread? At n = ``large`` (a window of one batch): the both-``batch`` row must equal mabn seed by
    seed (a control: the switches change nothing there), and whether mabn beats bn and whether the weight
    centering explains it (without it, mabn falls back to bn's level) or not (it stays at mabn's)."""
    if not any(c.runs[0].get("variant") for c in grid):  # not an ablation table
        return []
    by = by_cell(grid)
    stats = {k: _spread(c, key) for k, c in by.items()}
    out = []
    for c in grid:
        base = stats.get(("mabn", c.n))
        if c.norm != "mabn" or c.label == "mabn" or base is None or stats[(c.label, c.n)] is None:
            continue
        ab = stats[(c.label, c.n)]
        gap, spread = _versus(ab, base)
        out.append(f"- {c.label}@{c.n} worse than mabn@{c.n} beyond the seed spread: **{_worse(gap, spread)}** "
                   f"— {ab[0]:.2f} ± {ab[1]:.2f} vs {base[0]:.2f} ± {base[1]:.2f}: gap {gap:+.2f}, "
                   f"spread {spread:.2f}.")
    control = by.get(("mabn [forward_stat=batch, backward_stat=batch]", large))
    if control is not None and ("mabn", large) in by:
        mine = {r.get("seed"): r.get(key) for r in by[("mabn", large)].finished}
        pairs = [(r.get(key), mine[r.get("seed")]) for r in control.finished if r.get("seed") in mine]
        same = bool(pairs) and all(abs(a - b) < 1e-6 for a, b in pairs)
        out.append(f"- Control: mabn [forward_stat=batch, backward_stat=batch]@{large} equals mabn@{large} seed "
                   f"by seed (a window of one batch): **{'yes' if same else 'no'}** ({len(pairs)} seeds).")
    for n in sorted({c.n for c in grid}):  # where a centering row is: n = 32, and the small n it was run at
        out += _centering_claim(stats, n)
    return out


def settings_claims(grid: list[Cell], key: str = "top1_err") -> list[str]:
    """Each row with settings of its own (ROW_KEYS) against bn at its n: worse beyond the seed spread, and
    whether it equals bn seed by seed (a control whose settings make it bn)."""
    bns = {c.n: c for c in grid if c.label == "bn"}
    out = []
    for c in grid:
        bn = bns.get(c.n)
        if not c.runs[0].get("variant") or bn is None or _spread(c, key) is None or _spread(bn, key) is None:
            continue
        mine, base = _spread(c, key), _spread(bn, key)
        gap, spread = _versus(mine, base)
        by_seed = {r.get("seed"): r.get(key) for r in bn.finished}
        pairs = [(r.get(key), by_seed[r.get("seed")]) for r in c.finished if r.get("seed") in by_seed]
        same = " It equals bn seed by seed." if pairs and all(abs(a - b) < 1e-6 for a, b in pairs) else ""
        out.append(f"- {c.label}@{c.n} worse than bn@{c.n} beyond the seed spread: **{_worse(gap, spread)}** — "
                   f"{mine[0]:.2f} ± {mine[1]:.2f} vs {base[0]:.2f} ± {base[1]:.2f}: gap {gap:+.2f}, "
                   f"spread {spread:.2f}.{same}")
    return out


def _centering_claim(stats: dict, n: int) -> list[str]:
    """Whether mabn beats bn at n, and what the two centering rows say of why: mabn without its weight
    centering, and bn with it (``bn [weight_centering=true]``)."""
    mabn, bn = stats.get(("mabn", n)), stats.get(("bn", n))
    plain, centered = stats.get(("mabn [weight_centering=false]", n)), stats.get(("bn [weight_centering=true]", n))
    if not (mabn and bn and (plain or centered)):
        return []
    gap, spread = _versus(bn, mabn)
    out = [f"- mabn@{n} better than bn@{n} beyond the seed spread: **{_better(gap, spread)}** — "
           f"{mabn[0]:.2f} ± {mabn[1]:.2f} vs {bn[0]:.2f} ± {bn[1]:.2f}: gap {-gap:+.2f}, spread {spread:.2f}."]
    if gap <= spread:
        return out

    def where(row, name):
        (to_mabn, s_mabn), (to_bn, s_bn) = _versus(row, mabn), _versus(row, bn)
        near_mabn, near_bn = abs(to_mabn) <= s_mabn, abs(to_bn) <= s_bn
        if near_mabn != near_bn:
            place = "at mabn's level" if near_mabn else "at bn's level"
        elif near_mabn:  # within both spreads
            place = "undecided"
        else:
            place = ("worse than bn" if to_bn > s_bn else "better than mabn" if to_mabn < -s_mabn
                     else "between bn and mabn")
        out.append(f"- {name}@{n}: {row[0]:.2f} ± {row[1]:.2f}, {to_mabn:+.2f} from mabn (spread {s_mabn:.2f}), "
                   f"{to_bn:+.2f} from bn (spread {s_bn:.2f}): **{place}**.")
        return place

    places = {"plain": where(plain, "mabn [weight_centering=false]") if plain else None,
              "centered": where(centered, "bn [weight_centering=true]") if centered else None}
    if places["centered"] in ("worse than bn", "undecided"):
        verdict = "undecided by these rows: bn with centered filters is not between bn and mabn or above"
    elif places["centered"] in ("at mabn's level", "better than mabn"):
        verdict = ("the weight centering: bn with centered filters does as well as mabn"
                   + (" or better" if places["centered"] == "better than mabn" else ""))
    elif places["centered"] == "at bn's level":
        verdict = ("not the weight centering alone: bn with centered filters stays at bn's level, so mabn's edge "
                   "needs its normalization by the second moment (no mean subtraction) with the centering")
        if places["plain"] == "worse than bn":
            verdict += ", which that normalization cannot do without (mabn without it is worse than bn)"
    elif places["centered"] == "between bn and mabn":
        verdict = "partly the weight centering: bn with centered filters gains part of mabn's edge"
    elif places["plain"] == "at bn's level":
        verdict = "the weight centering (without it mabn is at bn's level)"
    elif places["plain"] == "between bn and mabn":
        verdict = "partly the weight centering: without it mabn keeps part of its edge over bn"
    elif places["plain"] == "at mabn's level":
        verdict = ("not the weight centering (without it mabn stays at its level): the normalization by the "
                   "second moment and the renorm correction")
    elif places["plain"] == "worse than bn":
        verdict = ("undecided by these rows: mabn needs its centering (without it, it is worse than bn), but "
                   "whether centering alone lifts bn needs the bn [weight_centering=true] row")
    else:
        verdict = "undecided by these rows"
    out.append(f"- What explains mabn@{n} beating bn@{n}: **{verdict}**.")
    return out


def _claim_sections(table: str, task: str, grid: list[Cell], key: str) -> list[str]:
    """The checked claims of a classification table: the paper's, a settings sweep's, an ablation's."""
    if task != "classification":
        return []
    out: list[str] = []
    checked = claims(grid, key)
    if checked:
        out += ["## The MABN paper's claims, checked on these records", "",
                "The paper (ImageNet, error): BN@2 35.2 far above BN@32 23.4, MABN@2 23.7 near BN@32, "
                "BRN@2 30.3 between. \"Beyond the seed spread\": the means differ by more than the sum of "
                "the two sample stds.", ""] + checked + [""]
        at_one = claims(grid, key, small=1)
        if at_one:  # where a small data set needs a smaller batch than ImageNet to hurt BN
            out += ["The same claims at n = 1:", ""] + at_one + [""]
    if table in ROW_KEYS:
        out += ["## Each setting against bn, checked on these records", "",
                f"Rows split by {', '.join(sorted({k for keys in ROW_KEYS[table].values() for k in keys}))}. "
                "\"Beyond the seed spread\": the means differ by more than the sum of the two sample stds.", ""]
        return out + settings_claims(grid, key) + [""]
    ablated = ablation_claims(grid, key)
    if ablated:
        out += ["## What each part of MABN does, checked on these records", "",
                "Each switch replaces one part of the published layer (configs/norm/mabn.yaml); the same "
                "criterion as above. Yan et al.: at small n the backward statistic Ψ is as noisy as the "
                "forward ones and hurts training too (so both moving averages matter); centred weights are "
                "optional, with a small accuracy drop without them.", ""] + ablated + [""]
    return out


def render_table(table: str, records: list[dict], figures: list[str] = (),
                 shorter: list[dict] | None = None, longer: tuple[str, list[dict]] | None = None) -> str:
    """The markdown of one results table: ours per cell, then the papers' numbers in their own columns.
    ``shorter``: the records of the table this one trains for longer (LONGER_OF), set beside it; ``longer``:
    (name, records) of a table that trains this one's cells for longer, whose claims follow this one's."""
    task = _task(records)
    grid = cells(records)
    metrics = METRICS[task]
    ns = sorted({c.n for c in grid})
    rows = list(dict.fromkeys(c.label for c in grid))
    by = by_cell(grid)
    out = [f"# {table}", "",
           f"Generated by `scripts/make_tables.py` from the {len(records)} records in `records/{table}/`; "
           "do not edit by hand. Each cell: mean ± sample std over seeds (runs). "
           "n = normalization batch (samples per norm-layer call).", "",
           f"Settings: {_settings(records)}.", ""]
    for key, header, lower in metrics:
        out += [f"## This repository: {header} ({'lower' if lower else 'higher'} is better)", "",
                "| norm | " + " | ".join(f"n={n}" for n in ns) + " |",
                "|---|" + "---|" * len(ns)]
        for label in rows:
            row = [format_cell(by[(label, n)], key) if (label, n) in by else "" for n in ns]
            out.append(f"| {label} | " + " | ".join(row) + " |")
        out.append("")
    out += _claim_sections(table, task, grid, metrics[0][0])
    if longer is not None and task == "classification":
        out += claims_at_longer(*longer, metrics[0][0])
    if task == "classification":
        out += settling(grid, metrics[0][0])
    if shorter is not None:
        out += against_shorter(grid, LONGER_OF[table], shorter, metrics[0][0])
    reported: list[Reported] = reported_for(task, table)
    out += ["## Reported in the papers (not this data or hardware unless stated; reference only)", "",
            "| norm | n | " + " | ".join(f"this repo: {h}" for _, h, _ in metrics) + " | runs | "
            + " | ".join(r.label for r in reported) + " |",
            "|---|---|" + "---|" * (len(metrics) + 1 + len(reported))]
    for c in grid:
        ours = [format_cell(c, key) for key, _, _ in metrics]
        # XBNBlock mixes GroupNorm into the run's norm, an ablation changes it: the papers' numbers are of
        # the published methods
        mixed = "xbn" in str(c.runs[0].get("model")) or bool(c.runs[0].get("variant"))
        out.append(f"| {c.label} | {c.n} | " + " | ".join(ours) + f" | {len(c.runs)} | "
                   + " | ".join("" if mixed else r.get(c.norm, c.n) for r in reported) + " |")
    sources = ("≈: read off the paper's figure. Papers: Yan et al. 2020 (MABN, official README); "
               "Wu & He 2018 (GN). MABN's ImageNet n is simulated inside 32-image device batches at SGD "
               "batch 256; GN's n is images per GPU." if task == "classification" else
               "Paper: Yan et al. 2020 (MABN, official README), COCO, Mask R-CNN R50-FPN, 2x "
               "(180k iterations) at 8 GPUs x 2 images.")
    out += ["", sources, "", "## Provenance", ""]
    out += _provenance(records)
    if figures:
        out += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(out) + "\n"


def _metric_rows(record: dict):
    """The rows of a record's metrics.jsonl (ours or detectron2's JSONWriter); none when it has no file."""
    path = Path(record["record_dir"]) / "metrics.jsonl"
    if not path.is_file():
        return
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from err


def _curve(record: dict) -> tuple[list[float], list[float]]:
    """(iteration, training loss) from a record's metrics.jsonl."""
    xs, ys = [], []
    for row in _metric_rows(record):
        loss = row.get("train/loss", row.get("total_loss"))
        if loss is not None:
            xs.append(row.get("iter", row.get("iteration")))
            ys.append(loss)
    return xs, ys


def _last_epoch_change(record: dict) -> float | None:
    """Top-1 error (points) at a run's last evaluation minus the one before; None with fewer than two."""
    errors = [100.0 - row["val/top1"] for row in _metric_rows(record) if row.get("val/top1") is not None]
    return errors[-1] - errors[-2] if len(errors) > 1 else None


def settling(grid: list[Cell], key: str = "top1_err") -> list[str]:
    """Has training settled? Each cell's mean change of top-1 error over its runs' last epoch beside the
    cell's seed std (a change larger than the spread could still move a comparison with more epochs). Empty
    when no run evaluated more than once (an iteration-length protocol evaluates at its end only)."""
    rows, moving, judged = [], 0, 0
    for c in grid:
        changes = [x for x in map(_last_epoch_change, c.finished) if x is not None]
        if not changes:
            continue
        change = statistics.fmean(changes)
        spread = _spread(c, key)
        if spread is not None:
            judged += 1
            moving += abs(change) > spread[1]
        std = f"{spread[1]:.2f}" if spread is not None else "(1 run)"
        rows.append(f"| {c.label} | {c.n} | {change:+.2f} ({len(changes)}) | {std} |")
    if not rows:
        return []
    if not judged:
        verdict = "No cell holds two finished seeds yet: no seed spread to judge the changes against."
    elif moving:
        verdict = (f"In {moving} of the {judged} cells with two or more seeds the last epoch changed the error "
                   "by more than the cell's seed std: the accuracies were still moving at the end (under a "
                   "schedule that anneals the learning rate to zero, part of that is the annealing), so the "
                   "table compares the norms after equal, short training; a longer one could change the gaps.")
    else:
        verdict = (f"In all {judged} cells with two or more seeds the last epoch changed the error by less "
                   "than the cell's seed std: settled at this length.")
    return (["## Has training settled?", "",
             "Change of top-1 err (points) over each run's last epoch (its last evaluation minus the one "
             "before; mean over the cell's finished runs), beside the cell's seed std.", "",
             "| norm | n | last-epoch change | seed std |", "|---|---|---|---|"] + rows + ["", verdict, ""])


def claims_at_longer(name: str, records: list[dict], key: str = "top1_err") -> list[str]:
    """The paper's claims checked on the records of ``name``, a table that trains this one's claim cells for
    longer (LONGER_OF), set right after this table's own: a comparison that has not settled can turn."""
    grid = cells(records)
    checked = claims(grid, key) + claims(grid, key, small=1)
    if not checked:
        return []
    return [f"## The same claims at {_length(records)} (`{name}.md`)", "",
            f"`{name}.md` trains the claims' cells for longer ({_settings(records)}); the same criterion, on "
            f"its {len(records)} records (its page sets each gap beside this table's on the same seeds):", ""
            ] + checked + [""]


def _by_seed(cell: Cell | None, key: str) -> dict:
    return {} if cell is None else {r.get("seed"): r[key] for r in cell.finished if r.get(key) is not None}


def _length(records: list[dict]) -> str:
    return ", ".join(sorted({str(r.get("epochs")) for r in records})) + " epochs"


def against_shorter(grid: list[Cell], shorter_name: str, shorter: list[dict], key: str = "top1_err") -> list[str]:
    """Has the shorter table settled? Each cell here beside the same cell of the shorter table on the same
    seeds, then the gaps the paper's claims compare (CLAIM_GAPS) at both lengths."""
    short = by_cell(cells(shorter))
    head, tail = _length(shorter), _length([r for c in grid for r in c.runs])
    rows = []
    for c in grid:
        was, now = _by_seed(short.get((c.label, c.n)), key), _by_seed(c, key)
        seeds = set(was) & set(now)
        if seeds:
            a, b = statistics.fmean(was[s] for s in seeds), statistics.fmean(now[s] for s in seeds)
            rows.append(f"| {c.label} | {c.n} | {len(seeds)} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    out = [f"## Against `{shorter_name}.md`: the same cells and seeds at {head}", ""]
    if not rows:
        return out + ["No cell has finished at both lengths on the same seed yet.", ""]
    out += ["Top-1 err (%), mean over the seeds that finished at both lengths.", "",
            f"| norm | n | seeds | {head} | {tail} | change |", "|---|---|---|---|---|---|"] + rows + [""]
    return out + _gaps_at_both_lengths(short, by_cell(grid), (head, tail), key)


def _gaps_at_both_lengths(short: dict, long: dict, lengths: tuple[str, str], key: str) -> list[str]:
    """Each claim's gap (a − b, mean over the seeds all four runs share) at both lengths; a gap that moved by
    more than the shorter table's seed spread of it (the claims' criterion) says it had not settled."""
    head, tail = lengths
    out, moved, judged = [], 0, 0
    for name_a, n_a, name_b, n_b in CLAIM_GAPS:
        a, b = (name_a, n_a), (name_b, n_b)
        runs = [_by_seed(table.get(cell), key) for table in (short, long) for cell in (a, b)]
        seeds = set.intersection(*(set(r) for r in runs))
        if not seeds:
            continue
        was, now = (statistics.fmean(x[s] - y[s] for s in seeds) for x, y in (runs[:2], runs[2:]))
        spreads = [_spread(short[cell], key) for cell in (a, b)]
        if all(spreads):
            judged += 1
            spread = spreads[0][1] + spreads[1][1]
            moved += abs(now - was) > spread
            verdict = f"{'moved beyond' if abs(now - was) > spread else 'within'} the spread {spread:.2f}"
        else:
            verdict = "no spread to judge by (fewer than two seeds in the shorter table)"
        out.append(f"- {name_a}@{n_a} − {name_b}@{n_b}: {was:+.2f} at {head}, {now:+.2f} at {tail} "
                   f"({len(seeds)} seed{'s' * (len(seeds) > 1)}): {verdict}.")
    if not out:
        return []
    out = ["The gaps the paper's claims compare, and MABN's edge at n = 32, on the seeds all four runs share; the "
           "spread is the shorter table's (sum of the two cells' sample stds over all its seeds):", ""] + out + [""]
    if judged:
        out += [f"**{moved} of {judged} gaps moved beyond the spread**: " + (
            f"the comparison at {head} had not settled." if moved else
            f"the comparison at {head} holds at {tail}, as far as these seeds show."), ""]
    return out


def plot_table(table: str, records: list[dict], out_dir: Path) -> list[str]:
    """<table>_vs_n.{png,svg} (metric vs normalization batch, one line per norm, std as error bars; the
    papers' curves in a separate panel) and <table>_curves.{png,svg} (training loss per norm, one line per n,
    mean over seeds). Returns the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = _task(records)
    grid = cells(records)
    names = [save_figure(_plot_vs_n(plt, table, task, grid), out_dir / f"{table}_vs_n"),
             save_figure(_plot_curves(plt, grid), out_dir / f"{table}_curves")]
    plt.close("all")
    return names


def _plot_vs_n(plt, table: str, task: str, grid: list[Cell]):
    """Our metric against n per norm (std as error bars) beside the first paper's curves."""
    key, header, _ = METRICS[task][0]
    reported = reported_for(task, table)[0]
    many = len({c.label for c in grid}) > 6
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2 if many else 4), sharey=False)
    variants = list(dict.fromkeys(c.label for c in grid if c.runs[0].get("variant")))
    plotted: list[tuple[str, int, float]] = []
    for label in dict.fromkeys(c.label for c in grid):
        mine = [c for c in grid if c.label == label]
        pts = [(c.n, *mean_std(c.values(key))) for c in mine if c.values(key)]
        if pts:
            n, mean, std = zip(*pts, strict=True)
            style = {"color": _color(mine[0].norm), "marker": _marker(mine[0].norm),
                     "linestyle": "-" if label == mine[0].norm else ":"}
            if label in variants:  # an ablation: a colour of its own, dashed
                style = {"color": f"C{(7 + variants.index(label)) % 10}", "linestyle": "--", "marker": "o"}
            axes[0].errorbar(n, mean, yerr=[s or 0.0 for s in std], capsize=3, label=label, **style)
            plotted.extend((label, x, m) for x, m in zip(n, mean, strict=True))
    for norm in dict.fromkeys(c.norm for c in grid):
        paper = reported.values.get(norm)
        if paper:
            axes[1].plot(sorted(paper), [paper[k] for k in sorted(paper)], marker=_marker(norm), linestyle="--",
                         label=norm, color=_color(norm))
    _clip_collapsed(axes[0], plotted)
    axes[0].set_title(f"this repository: {table}")
    axes[1].set_title(reported.label)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("normalization batch n")
        ax.set_ylabel(header if ax is axes[0] else reported.metric)
        ax.grid(alpha=0.3)
        entries = len(ax.get_legend_handles_labels()[0])
        if entries > 6:  # many norms: the legend below the panel, where it hides no point
            ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        elif entries:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _clip_collapsed(ax, points: list[tuple[str, int, float]]) -> None:
    """Keep the axis on the differences that matter: a cell far above the rest (bn at n = 1 with 38 % error
    beside 8-10 %) is drawn at the top edge as an arrow with its value, instead of stretching the axis."""
    if len(points) < 3:
        return
    values = sorted(m for _, _, m in points)
    median = values[len(values) // 2]
    spread = max(values[len(values) * 3 // 4] - values[len(values) // 4], 0.5)
    limit = median + 6 * spread
    high = [(label, n, m) for label, n, m in points if m > limit]
    if not high:
        return
    kept = [m for _, _, m in points if m <= limit]
    top = max(kept) + 0.15 * (max(kept) - min(kept) + 1)
    ax.set_ylim(min(kept) - 0.1 * (max(kept) - min(kept) + 1), top)
    for label, n, m in high:
        ax.annotate(f"{label}@{n}: {m:.1f} (off axis)", xy=(n, top), xytext=(n * 1.12, top - 0.1 * (top - min(kept))),
                    ha="left", va="center", fontsize=8, arrowprops={"arrowstyle": "->"})


def _plot_curves(plt, grid: list[Cell]):
    """Training loss per row (norm), one line per n, mean over the finished seeds."""
    rows = list(dict.fromkeys(c.label for c in grid))
    cols = min(4, len(rows))  # a grid of panels, not a strip: four to a row
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, figsize=(3.6 * cols, 3.0 * ((len(rows) + cols - 1)
                             // cols)), squeeze=False, sharey=True)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for ax, label in zip(axes.flat, rows, strict=False):
        for c in (c for c in grid if c.label == label):
            curves = [_curve(r) for r in c.finished]
            curves = [cv for cv in curves if cv[0]]
            if not curves:
                continue
            length = min(len(cv[0]) for cv in curves)  # seeds logged at the same iterations
            mean = [statistics.fmean(cv[1][i] for cv in curves) for i in range(length)]
            ax.plot(curves[0][0][:length], mean, label=f"n={c.n} ({len(curves)})")
        ax.set_title(label)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for row in axes:
        row[0].set_ylabel("training loss (mean over seeds)")
    fig.tight_layout()
    return fig


# one colour and one marker per registered norm, the same in every figure (tab20's dark halves first)
_PALETTE = ("#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f", "#393b79", "#637939", "#843c39")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d")
_FIGURE_ORDER = [*NORM_ORDER, "cbn", "gnws", "evonorm_s0", "frn", "ln", "in"]


def _style_index(norm: str) -> int:
    return _FIGURE_ORDER.index(norm) if norm in _FIGURE_ORDER else len(_FIGURE_ORDER)


def _color(norm: str) -> str:
    """The same colour for a norm in every panel and table."""
    return _PALETTE[_style_index(norm) % len(_PALETTE)]


def _marker(norm: str) -> str:
    return _MARKERS[_style_index(norm) % len(_MARKERS)]


def save_figure(fig, stem: Path) -> str:
    """stem.png and stem.svg, byte-identical when regenerated from the same records (no dates, fixed ids)."""
    import matplotlib

    stem.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "mabn-results"}):
        fig.savefig(stem.with_suffix(".png"), dpi=120, metadata={"Software": None})
        fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None, "Creator": None})
    return stem.with_suffix(".png").name


def make_tables(records_root: Path, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write out_dir/<table>.md (and its figures) for every table under records_root."""
    written = []
    tables = load_tables(records_root)  # every record read and checked before anything is written
    for table, records in tables.items():
        try:  # one protocol per table; several models are rows of their own (cells)
            check_protocol(records, rows=() if is_statistics_table(records) else ("model",))
        except ValueError as err:
            raise ValueError(f"records/{table}: {err}") from err
    out_dir.mkdir(parents=True, exist_ok=True)
    for table, records in sorted(tables.items()):
        path = out_dir / f"{table}.md"
        if is_statistics_table(records):  # Wu & Johnson's treatments of the statistics: its own layout
            path.write_text(render_statistics(table, records, _settings(records), _provenance(records)))
            written.append(path)
            continue
        figures = plot_table(table, records, out_dir / "figures") if plots else []
        longer = next(((name, tables[name]) for name, base in LONGER_OF.items() if base == table and name in tables),
                      None)
        path.write_text(render_table(table, records, [f"figures/{f}" for f in figures],
                                     shorter=tables.get(LONGER_OF.get(table, "")), longer=longer))
        written.append(path)
    return written
