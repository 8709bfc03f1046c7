"""results/fmnist_precise_bn.md's generator (mabn/statistics_table.py): cells keyed by norm, n and treatment,
intervals over seeds, Wu & Johnson's findings judged by them, and no pooling of different protocols."""

import json
import statistics

import pytest

from mabn.results import make_tables
from mabn.statistics_table import check_protocol, claims, grid, interval, t975, treatments

BASE = {"task": "classification", "data": "fmnist", "model": "cifar_resnet8", "device_batch": 32, "world_size": 1,
        "sgd_batch": 32, "epochs": 1, "iters": 1250, "val_count": 10000, "status": "finished"}


def record(norm, n, seed, ema, precise=None, batch=None, frozen=False, **extra):
    """A summary.json as the entry script writes it; precise: {B: error}."""
    evals = [{"stats": "ema", "top1": 100 - ema, "count": 10000}]
    if batch is not None:
        evals.append({"stats": "batch", "batch": n, "top1": 100 - batch, "count": 10000})
    for b, err in (precise or {}).items():
        evals.append({"stats": "precise", "batch": b, "images": 10000, "top1": 100 - err, "count": 10000})
    return {**BASE, "norm": norm, "norm_batch": n, "seed": seed, "top1": 100 - ema, "evals": evals,
            "norms_frozen_at": 1000 if frozen else None, "record_dir": f"r/{norm}{n}s{seed}{frozen}", **extra}


def test_t_quantiles_and_intervals():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(12) == t975(10) and t975(100) == 1.96
    iv = interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.half == pytest.approx(4.303 * statistics.stdev([1, 2, 3]) / 3 ** 0.5)
    assert interval([5.0]).half is None and interval([]) is None


def test_treatments_of_one_run():
    got = treatments(record("bn", 2, 0, 30.0, {2: 29.0, 10: 28.0, 100: 27.5, 10000: 27.4}, batch=26.0))
    assert got == {"ema": 30.0, "precise_n": 29.0, "precise_10": 28.0, "precise_100": 27.5, "precise_N": 27.4,
                   "batch": 26.0}
    assert treatments(record("bn", 2, 0, 25.0, frozen=True)) == {"frozen": 25.0}  # evaluated with frozen stats


def _table(gap_small=3.0, frozen_small=25.0, plateau=0.0):
    recs = []
    for seed, noise in enumerate((0.0, 0.2, -0.2)):
        for n, ema, gap in ((2, 35.0, gap_small), (32, 24.0, 0.0)):
            precise_n = ema - gap + plateau
            recs.append(record("bn", n, seed, ema + noise, {n: precise_n + 1 + noise, 10: ema - gap + 0.5 + noise,
                                                            100: ema - gap + plateau + noise,
                                                            10000: ema - gap + noise}, batch=26.0 + noise))
            recs.append(record("bn", n, seed, (frozen_small if n == 2 else 24.2) + noise, frozen=True))
        recs.append(record("mabn", 2, seed, 24.0 + noise, {10000: 23.9 + noise}))
    return recs


def test_findings_that_hold():
    text = "\n".join(claims(grid(_table())))
    assert "1. The EMA − precise (B = N) gap grows as n shrinks" in text and text.count("**holds**") == 5, text
    assert "n=2: +3.00 [+3.00, +3.00]" in text  # paired per seed: the same gap in every seed, no spread
    assert "4. Freezing the norms for the last 20 % removes most of the small-n loss" in text
    assert "91% of bn's loss at n=2" in text  # (35 − 25) / (35 − 24)
    assert "6. EMA − precise (B = N) of the other batch-dependent norms" in text and "mabn@2 +0.10" in text


def test_findings_that_fail_are_reported_as_such():
    text = "\n".join(claims(grid(_table(gap_small=0.0, frozen_small=34.0, plateau=1.0))))
    assert "grows as n shrinks (Wu & Johnson: −0.2 at 32, +3.5 at 2): **does not hold**" in text
    assert "reaches the plateau (Wu & Johnson: B = 100 equals B = N to 0.0 at both n): **does not hold**" in text
    assert "removes most of the small-n loss (Wu & Johnson, of the loss against EMA at 32: frozen 25.2 " \
           "against EMA 35.5: 87 %): **does not hold**" in text


def test_one_protocol_per_table():
    recs = _table()
    recs[0] = {**recs[0], "iters": 20}
    with pytest.raises(ValueError, match=r"differ in their protocol, which a cell would pool: iters: 1250, 20"):
        check_protocol(recs)
    dup = _table() + [record("bn", 2, 0, 30.0)]
    with pytest.raises(ValueError, match=r"a second record of \('bn', 2, 'ema'\) for seed 0"):
        grid(dup)


def test_make_tables_renders_a_statistics_table(tmp_path):
    """Through the real generator: records on disk -> the table, its findings, Wu & Johnson's own columns."""
    root = tmp_path / "records" / "fmnist_precise_bn"
    for i, rec in enumerate(_table()):
        run = root / f"run{i}"
        run.mkdir(parents=True)
        rec = {k: v for k, v in rec.items() if k != "record_dir"}
        (run / "summary.json").write_text(json.dumps({**rec, "git_sha": "abc", "device": "CPU",
                                                      "command": "train_imagenet.py experiment=fmnist_precise_bn"}))
    [path] = make_tables(tmp_path / "records", tmp_path / "out", plots=False)
    text = path.read_text()
    assert "| norm | n | EMA | precise B = n | B = 10 | B = 100 | B = N | frozen last 20 % | batch stats at test |" \
        in text
    assert "| bn | 2 | 35.00 ± 0.50 (3) |" in text  # t(2) * 0.2 / sqrt(3) = 0.50
    assert "| bn | 2 | 35.5 | 34.4 | 32.3 | 32 | 32 | 32 | ≈32.5 | ≈25.2 | ≈26 |" in text  # theirs, labelled
    assert "## Wu & Johnson's findings, checked on these records" in text
