"""The table of inference-statistics treatments (results/fmnist_precise_bn.md): Wu & Johnson's question.

Each record of such a table is one training run. A run of ``experiment=fmnist_precise_bn`` holds several
evaluations of the same final weights in ``summary.json``'s ``evals``: the running averages (EMA), PreciseBN at
estimation batches B (B = n, 10, 100, N) and mini-batch statistics at test. A run of
``experiment=fmnist_frozen_bn`` (``norms_frozen_at`` set) trained with the norms frozen for the last 20 % and is
evaluated with the frozen statistics. A table is of this kind when its records carry such evaluations
(:func:`is_statistics_table`); its cells are keyed by structure — norm, n, treatment — never by a label.

Numbers are top-1 error (%), mean and a 95 % confidence interval over seeds (Student's t). Differences
between treatments of the same run (EMA against precise, B = 100 against B = N) are paired by seed: the
interval is of the per-seed difference. Differences between runs (n = 2 against n = 32, frozen against EMA)
are unpaired: the interval uses both standard errors and the smaller sample's degrees of freedom (a
conservative Welch interval).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from .papers import WU_JOHNSON
from .records import check_protocol

# t quantiles (0.975) by degrees of freedom: the 95 % two-sided interval of a mean over df + 1 seeds
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}
PLATEAU_MARGIN = 0.3  # points of error: B reaches the plateau when its paired difference to B = N is inside this
TREATMENTS = ("ema", "precise_n", "precise_10", "precise_100", "precise_N", "frozen", "batch")
HEADERS = {"ema": "EMA", "precise_n": "precise B = n", "precise_10": "B = 10", "precise_100": "B = 100",
           "precise_N": "B = N", "frozen": "frozen last 20 %", "batch": "batch stats at test"}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    known = max(k for k in _T975 if k <= df)
    return _T975[known] if df <= 30 else 1.96


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float | None  # half-width of the 95 % interval; None with one value
    count: int

    @property
    def low(self) -> float:
        return self.mean - (self.half or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half or 0.0)

    def text(self) -> str:
        if self.half is None:
            return f"{self.mean:.2f} ({self.count})"
        return f"{self.mean:.2f} ± {self.half:.2f} ({self.count})"


def interval(values: list[float]) -> Interval | None:
    if not values:
        return None
    if len(values) == 1:
        return Interval(values[0], None, 1)
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return Interval(statistics.fmean(values), t975(len(values) - 1) * sem, len(values))


def unpaired(a: list[float], b: list[float]) -> Interval | None:
    """mean(a) − mean(b) with a conservative Welch interval (df = the smaller sample's − 1)."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return Interval(statistics.fmean(a) - statistics.fmean(b), t975(min(len(a), len(b)) - 1) * se,
                    min(len(a), len(b)))


def is_statistics_table(records: list[dict]) -> bool:
    """Records of runs evaluated several ways, or trained with frozen norms."""
    return any(len(r.get("evals") or []) > 1 or r.get("norms_frozen_at") is not None for r in records)


def treatments(record: dict) -> dict[str, float]:
    """{treatment: top-1 error} of one run."""
    err = {}
    frozen = record.get("norms_frozen_at") is not None
    n = int(record["norm_batch"])
    for row in record.get("evals") or []:
        value = round(100.0 - row["top1"], 4)
        if row["stats"] == "ema":
            err["frozen" if frozen else "ema"] = value
        elif row["stats"] == "batch" and not frozen:
            err["batch"] = value
        elif row["stats"] == "precise" and not frozen:
            b, images = row.get("batch"), row.get("images")
            if b == images and b is not None:
                err["precise_N"] = value
            elif b in (10, 100):
                err[f"precise_{b}"] = value
            if b == n:
                err["precise_n"] = value
    return err


def grid(records: list[dict]) -> dict[tuple[str, int, str], dict[int, float]]:
    """{(norm, n, treatment): {seed: error}} over the finished records (of one protocol)."""
    check_protocol(records)
    out: dict = defaultdict(dict)
    for record in records:
        if record.get("status", "finished") != "finished":
            continue
        for name, value in treatments(record).items():
            key = (str(record["norm"]), int(record["norm_batch"]), name)
            if record.get("seed") in out[key]:
                raise ValueError(f"{record['record_dir']}: a second record of {key} for seed {record.get('seed')}")
            out[key][record.get("seed")] = value
    return dict(out)


def _differences(g: dict, a: tuple, b: tuple) -> list[float]:
    """a − b seed by seed, over the seeds both cells have (in seed order)."""
    seeds = sorted(set(g.get(a, {})) & set(g.get(b, {})), key=str)
    return [g[a][s] - g[b][s] for s in seeds]


def _paired(g: dict, a: tuple, b: tuple) -> Interval | None:
    """The interval of the per-seed difference a − b."""
    return interval(_differences(g, a, b))


def _values(g: dict, key: tuple) -> list[float]:
    return list(g.get(key, {}).values())


def _verdict(ok: bool | None) -> str:
    return "**holds**" if ok else ("**does not hold**" if ok is not None else "not enough seeds to judge")


def _gap_text(iv: Interval | None) -> str:
    if iv is None:
        return "–"
    return f"{iv.mean:+.2f}" + (f" [{iv.low:+.2f}, {iv.high:+.2f}]" if iv.half is not None else "")


def _gap_claim(g: dict, bn_ns: list[int], small: int, large: int) -> str:
    """1. The EMA − precise gap grows as n shrinks."""
    gaps = {n: _paired(g, ("bn", n, "ema"), ("bn", n, "precise_N")) for n in bn_ns}
    line = ", ".join(f"n={n}: {_gap_text(gaps[n])}" for n in bn_ns if gaps[n] is not None)
    grow = None
    if gaps.get(small) and gaps.get(large) and gaps[small].half is not None and gaps[large].half is not None:
        diff = unpaired(*(_differences(g, ("bn", n, "ema"), ("bn", n, "precise_N")) for n in (small, large)))
        grow = diff is not None and diff.low > 0
        line += f"; gap at n={small} − gap at n={large}: {_gap_text(diff)}"
    return (f"1. The EMA − precise (B = N) gap grows as n shrinks (Wu & Johnson: −0.2 at 32, +3.5 at 2): "
            f"{_verdict(grow)}. bn, paired per seed, points of error: {line}.")


def _plateau_claims(g: dict, bn_ns: list[int]) -> list[str]:
    """2. B = 100 reaches the plateau (B = N), for every norm and n measured; and B = n beside it."""
    rows, ok = [], []
    for (norm, n, t) in sorted(g):
        d = _paired(g, (norm, n, "precise_100"), (norm, n, "precise_N")) if t == "precise_100" else None
        if d is None:
            continue
        rows.append(f"{norm}@{n} {_gap_text(d)}" + (" (one seed: not judged)" if d.half is None else ""))
        if d.half is not None:
            ok.append(d.low >= -PLATEAU_MARGIN and d.high <= PLATEAU_MARGIN)
    small_b = [(n, _paired(g, ("bn", n, "precise_n"), ("bn", n, "precise_N"))) for n in bn_ns]
    return [f"2. B ≈ 100 reaches the plateau (Wu & Johnson: B = 100 equals B = N to 0.0 at both n): "
            f"{_verdict(all(ok) if ok else None)}, judged as the paired interval of B = 100 − B = N inside "
            f"±{PLATEAU_MARGIN}: " + "; ".join(rows) + ".",
            "   Estimating at B = n instead (the old PreciseBN here), bn: "
            + "; ".join(f"n={n} {_gap_text(d)}" for n, d in small_b if d is not None)
            + " (Wu & Johnson at NBS 32, B = 2: +5.3)."]


def _curve_claim(g: dict, bn_ns: list[int], small: int, large: int) -> str:
    """3. The shape of the n curve with population statistics: flat at large n, rising at small n."""
    curve = {n: interval(_values(g, ("bn", n, "precise_N"))) for n in bn_ns}
    rise = unpaired(_values(g, ("bn", small, "precise_N")), _values(g, ("bn", large, "precise_N")))
    shape = None if rise is None else rise.low > 0
    return (f"3. The n curve with population statistics is flat at large n and rises at small n (Wu & "
            f"Johnson, B = N: 23.5 at 32 and 16, 24.3 at 8, 26.4 at 4, 32.5 at 2): {_verdict(shape)} "
            f"(rise n={small} over n={large}: {_gap_text(rise)}). bn, B = N: "
            + ", ".join(f"n={n} {curve[n].text()}" for n in bn_ns if curve[n]) + ".")


def _recovery_claims(g: dict, small: int, large: int) -> list[str]:
    """4, 5. Freezing, or batch statistics at test, removes most of the small-n loss."""
    out = []
    loss = unpaired(_values(g, ("bn", small, "ema")), _values(g, ("bn", large, "ema")))
    for item, t, words, paper in ((4, "frozen", "freezing the norms for the last 20 %", "frozen 25.2 against "
                                   "EMA 35.5: 87 %"),
                                  (5, "batch", "mini-batch statistics at test", "26.0 against 35.5: 81 %")):
        gain = unpaired(_values(g, ("bn", small, "ema")), _values(g, ("bn", small, t)))
        if loss is None or gain is None or loss.mean <= 0:
            out.append(f"{item}. {words[0].upper() + words[1:]} removes most of the small-n loss: "
                       f"{_verdict(None)}" + (" (no small-n loss to remove)" if loss and loss.mean <= 0 else "")
                       + ".")
            continue
        share = gain.mean / loss.mean
        holds = share > 0.5 and gain.low > 0
        out.append(f"{item}. {words[0].upper() + words[1:]} removes most of the small-n loss (Wu & Johnson, of the "
                   f"loss against EMA at 32: {paper}): {_verdict(holds)}, {share:.0%} of bn's loss at n={small} "
                   f"(EMA@{small} − EMA@{large} = {_gap_text(loss)}; EMA@{small} − {t}@{small} = "
                   f"{_gap_text(gain)}).")
    return out


def claims(g: dict, small: int = 2, large: int = 32) -> list[str]:
    """Wu & Johnson's findings, each judged by a 95 % interval; then mabn's and brn's EMA − precise gaps."""
    bn_ns = sorted({n for (norm, n, _) in g if norm == "bn"})
    out = [_gap_claim(g, bn_ns, small, large), *_plateau_claims(g, bn_ns), _curve_claim(g, bn_ns, small, large),
           *_recovery_claims(g, small, large)]
    others = []
    for norm in sorted({norm for (norm, _, _) in g} - {"bn"}):
        for n in sorted({n for (m, n, _) in g if m == norm}):
            d = _paired(g, (norm, n, "ema"), (norm, n, "precise_N"))
            if d is not None:
                others.append(f"{norm}@{n} {_gap_text(d)}")
    if others:
        out.append("6. EMA − precise (B = N) of the other batch-dependent norms (MABN keeps χ² averaged over "
                   "its window; BRN's running averages): " + "; ".join(others) + ".")
    return out


def render(table: str, records: list[dict], settings: str, provenance: list[str]) -> str:
    """The markdown of a statistics-treatment table."""
    g = grid(records)
    keys = sorted({(norm, n) for (norm, n, _) in g},
                  key=lambda k: (["bn", "brn", "mabn"].index(k[0]) if k[0] in ("bn", "brn", "mabn") else 9, k[1]))
    shown = [t for t in TREATMENTS if any(k[2] == t for k in g)]
    out = [f"# {table}", "",
           f"Generated by `scripts/make_tables.py` from the {len(records)} records in `records/{table}/`; do not "
           "edit by hand. Top-1 error (%) of the same final weights evaluated with each treatment of the "
           "normalization statistics: mean ± half-width of the 95 % confidence interval over seeds (Student's "
           "t), runs in brackets. n = normalization batch; B = the estimation batch of PreciseBN "
           "(`mabn/precise_bn.py`: exact population moments over N = 10⁴ training images, normalized in batches "
           "of B, model in train mode, weights fixed); frozen = a separate run with the norms frozen at their "
           "population statistics for the last 20 % of training (`train.freeze_norms_from=0.8`); batch stats = "
           "each test batch normalized in groups of n, as in training (`eval.norm_stats=batch`).", "",
           f"Settings: {settings}.", "",
           "## This repository: top-1 error (%) (lower is better)", "",
           "| norm | n | " + " | ".join(HEADERS[t] for t in shown) + " |",
           "|---|---|" + "---|" * len(shown)]
    for norm, n in keys:
        cells = [interval(_values(g, (norm, n, t))) for t in shown]
        out.append(f"| {norm} | {n} | " + " | ".join(c.text() if c else "" for c in cells) + " |")
    out += ["", "## Wu & Johnson's findings, checked on these records", "",
            "Each judged by a 95 % interval (paired per seed within a run, conservative Welch between runs); "
            "their numbers are ImageNet ResNet-50 at 100 epochs, a reference for the direction, not a target.",
            ""] + claims(g) + [""]
    out += ["## Reported by Wu & Johnson 2021 (ImageNet ResNet-50, SGD batch 256; reference only)", "",
            "| norm | n | " + " | ".join(h for _, h in WU_JOHNSON.columns) + " |",
            "|---|---|" + "---|" * len(WU_JOHNSON.columns)]
    for n in WU_JOHNSON.batches:
        out.append(f"| bn | {n} | " + " | ".join(WU_JOHNSON.get(key, n) for key, _ in WU_JOHNSON.columns) + " |")
    out += ["", WU_JOHNSON.source, "", "## Provenance", ""] + provenance
    return "\n".join(out) + "\n"
