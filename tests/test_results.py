"""results/ generation: tables hold exactly the records' aggregates, papers' numbers only in their columns."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mabn.papers import MABN_IMAGENET
from mabn.results import cells, collect, load_tables, make_tables, render_table

ROOT = Path(__file__).resolve().parents[1]


def write_run(root: Path, name: str, **summary) -> Path:
    run = root / name
    (run / "hydra").mkdir(parents=True)
    base = {"task": "classification", "experiment": "fmnist", "data": "fmnist", "model": "cifar_resnet20",
            "device_batch": 32, "world_size": 1, "sgd_batch": 32, "epochs": 3, "iters": 100,
            "status": "finished",
            "device": "CPU test", "git_sha": "abc123", "torch": "2.x", "wall_time_s": 360.0,
            "finished": "2026-11-24T00:00:00+0000", "command": f"train_imagenet.py {name}"}
    (run / "summary.json").write_text(json.dumps({**base, **summary}))
    lines = (json.dumps({"iter": i, "train/loss": 2.0 / i}) + "\n" for i in (1, 2, 3))
    (run / "metrics.jsonl").write_text("".join(lines))
    (run / "hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"not copied")
    return run


@pytest.fixture
def sweep(tmp_path):
    """A small sweep: bn@2 over three seeds, bn@32 once, mabn@2 once + one diverged bn@1."""
    runs = tmp_path / "runs"
    for seed, top1 in enumerate((90.0, 91.0, 92.0)):
        write_run(runs, f"bn-n2-s{seed}", norm="bn", norm_batch=2, seed=seed, top1=top1)
    write_run(runs, "bn-n32-s0", norm="bn", norm_batch=32, seed=0, top1=93.5)
    write_run(runs, "mabn-n2-s0", norm="mabn", norm_batch=2, seed=0, top1=93.25)
    write_run(runs, "bn-n1-s0", norm="bn", norm_batch=1, seed=0, top1=None, status="diverged",
              error="non-finite loss nan at iteration 7")
    write_run(runs, "unfinished", norm="bn", norm_batch=4, seed=0, top1=50.0)
    (runs / "unfinished" / "summary.json").unlink()
    return runs


def test_collect_copies_records_only_and_files_them_by_experiment(sweep, tmp_path):
    records = tmp_path / "records"
    written = collect(sorted(sweep.iterdir()), records)
    assert len(written) == 6 and not (records / "fmnist" / "unfinished").exists()
    assert sorted(p.name for p in (records / "fmnist" / "bn-n2-s0").iterdir()) == \
        ["config.yaml", "metrics.jsonl", "summary.json"]  # no checkpoints
    with pytest.raises(ValueError, match="names no experiment"):
        run = write_run(tmp_path / "other", "x", norm="bn", norm_batch=2, seed=0, top1=1.0, experiment=None)
        collect([run], records)
    assert collect([tmp_path / "other" / "x"], records, table="mine")[0] == records / "mine" / "x"


def test_cells_aggregate_seeds_and_count_divergence(sweep, tmp_path):
    collect(sorted(sweep.iterdir()), tmp_path / "records")
    (records,) = load_tables(tmp_path / "records").values()
    grid = {(c.norm, c.n): c for c in cells(records)}
    assert list(grid) == [("bn", 1), ("bn", 2), ("bn", 32), ("mabn", 2)]
    assert grid[("bn", 2)].values("top1_err") == [10.0, 9.0, 8.0]
    assert grid[("bn", 1)].values("top1_err") == [] and len(grid[("bn", 1)].diverged) == 1


def test_table_holds_exactly_the_aggregates_and_labelled_paper_numbers(sweep, tmp_path):
    collect(sorted(sweep.iterdir()), tmp_path / "records")
    records = load_tables(tmp_path / "records")["fmnist"]
    text = render_table("fmnist", records)
    ours = text.split("## This repository")[1].split("\n## ")[0]
    assert "| bn | diverged (1/1) | 9.00 ± 1.00 (3) | 6.50 (1) |" in ours
    assert "| mabn |  | 6.75 (1) |  |" in ours
    # every number in our section is a record's aggregate, a count, or a header's n
    allowed = {"9.00", "1.00", "3", "6.50", "6.75", "1", "2", "32"}
    assert set(re.findall(r"\d+(?:\.\d+)?", ours)) <= allowed
    paper = text.split("## Reported")[1]
    assert "| bn | 2 | 9.00 ± 1.00 (3) | 3 | 35.22 | 34.7 |" in paper  # MABN README table; GN paper 100-65.3
    assert "| mabn | 2 | 6.75 (1) | 1 | 23.67 |  |" in paper
    assert MABN_IMAGENET.get("bn", 8) == "≈25.5" and MABN_IMAGENET.get("gn", 2) == ""
    assert "CPU test (6)" in text and "abc123 (6)" in text and "`python train_imagenet.py bn-n2-s0`" in text
    assert "seeds 0/1/2" in text and "2026-11-24T00:00:00+0000" in text


def test_detection_table_shows_box_and_mask_ap(tmp_path):
    runs = tmp_path / "runs"
    for norm, box, mask in (("bn", 20.0, 18.0), ("mabn", 24.0, 21.5)):
        write_run(runs, f"{norm}", task="detection", experiment="shapes", norm=norm, norm_batch=2, seed=0,
                  bbox_AP=box, segm_AP=mask)
    collect(sorted(runs.iterdir()), tmp_path / "records")
    text = render_table("shapes", load_tables(tmp_path / "records")["shapes"])
    assert "## This repository: box AP (higher is better)" in text and "| mabn | 24.00 (1) |" in text
    assert "## This repository: mask AP" in text and "| bn | 18.00 (1) |" in text
    assert "| mabn | 2 | 24.00 (1) | 21.50 (1) | 1 | 36.5 | 32.69 |" in text  # the paper's 2x from-scratch AP


def test_another_model_is_another_row_not_another_seed(sweep, tmp_path):
    write_run(sweep, "xbn-bn-n2-s0", norm="bn", norm_batch=2, seed=0, top1=95.0, model="cifar_resnet20_xbn")
    collect(sorted(sweep.iterdir()), tmp_path / "records")
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    assert "| bn (cifar_resnet20) | diverged (1/1) | 9.00 ± 1.00 (3) | 6.50 (1) |" in text
    assert "| bn (cifar_resnet20_xbn) |  | 5.00 (1) |  |" in text
    assert "| bn (cifar_resnet20_xbn) | 2 | 5.00 (1) | 1 |  |  |" in text  # the papers' bn is not XBNBlock
    assert "| bn (cifar_resnet20) | 2 | 9.00 ± 1.00 (3) | 3 | 35.22 | 34.7 |" in text


def test_mixed_tasks_in_one_table_are_refused(tmp_path):
    records = [{"task": "classification", "norm": "bn", "norm_batch": 2},
               {"task": "detection", "norm": "bn", "norm_batch": 2}]
    with pytest.raises(ValueError, match="mix"):
        render_table("x", records)


def test_records_of_different_protocols_are_refused_with_the_keys_named(sweep, tmp_path):
    """A 20-iteration smoke run beside a sweep's 100-iteration ones, evaluated on fewer images: the script exits
    with one line naming each differing key and its values, and writes nothing (a cell would pool them)."""
    write_run(sweep, "bn-n2-s9", norm="bn", norm_batch=2, seed=9, top1=40.0, iters=20, val_count=640)
    res = script(tmp_path, "--collect", *sorted(sweep.iterdir()), "--records", tmp_path / "records",
                 "--out", tmp_path / "out")
    assert res.returncode != 0 and not (tmp_path / "out" / "fmnist.md").exists()
    assert "records/fmnist: the records of one table differ in their protocol, which a cell would pool: " \
           "iters: 100, 20; val_count: 640, None" in res.stderr, res.stderr


def test_make_tables_writes_markdown_and_figures(sweep, tmp_path):
    collect(sorted(sweep.iterdir()), tmp_path / "records")
    (md,) = make_tables(tmp_path / "records", tmp_path / "out")
    assert md == tmp_path / "out" / "fmnist.md"
    for stem in ("fmnist_vs_n", "fmnist_curves"):
        for ext in ("png", "svg"):
            assert (tmp_path / "out" / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert "![fmnist_vs_n](figures/fmnist_vs_n.png)" in md.read_text()


def script(cwd: Path, *args) -> subprocess.CompletedProcess:
    """scripts/make_tables.py run as a user runs it, from cwd."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_script_collects_and_reports_bad_input(sweep, tmp_path):
    empty = script(tmp_path, "--records", tmp_path / "none", "--out", tmp_path / "out")
    assert empty.returncode == 2 and "no records folder" in empty.stderr
    out = script(tmp_path, "--collect", *sorted(sweep.iterdir()), "--records", tmp_path / "rec",
                 "--out", tmp_path / "out", "--no-plots")
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'out' / 'fmnist.md'}" in out.stdout
    assert not (tmp_path / "out" / "figures").exists()


def test_script_names_every_bad_record_and_what_is_wrong(sweep, tmp_path):
    records = tmp_path / "rec"
    collect(sorted(sweep.iterdir()), records)
    truncated = records / "fmnist" / "bn-n2-s0" / "summary.json"
    truncated.write_text('{"task": "classifi')  # a write cut short
    no_norm = records / "fmnist" / "mabn-n2-s0" / "summary.json"
    no_norm.write_text(json.dumps({k: v for k, v in json.loads(no_norm.read_text()).items() if k != "norm"}))
    listed = records / "fmnist" / "bn-n32-s0" / "summary.json"
    listed.write_text("[1, 2]")
    out = script(tmp_path, "--records", records, "--out", tmp_path / "out", "--no-plots")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "3 bad record(s)" in out.stderr
    assert f"{truncated}: not valid JSON (Unterminated string" in out.stderr
    assert f"{no_norm}: missing norm (every record needs norm, norm_batch)" in out.stderr
    assert f"{listed}: expected a JSON object, found list" in out.stderr
    assert not (tmp_path / "out").exists()
    # --collect reads a run's summary.json for its experiment: a broken one is named there too
    (sweep / "bn-n2-s1" / "summary.json").write_text("{")
    out = script(tmp_path, "--collect", sweep / "bn-n2-s1", "--records", tmp_path / "rec2",
                 "--out", tmp_path / "o")
    assert out.returncode == 2 and f"{sweep / 'bn-n2-s1' / 'summary.json'}: not valid JSON" in out.stderr


def test_script_writes_the_repository_results_only_from_its_own_records(sweep, tmp_path):
    collect(sorted(sweep.iterdir()), tmp_path / "rec")
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "results").rglob("*") if p.is_file()}
    refused = script(ROOT, "--records", tmp_path / "rec", "--no-plots")
    assert refused.returncode == 2 and "--out is required with --records" in refused.stderr, refused.stderr
    inside = script(tmp_path, "--records", tmp_path / "rec", "--out", ROOT / "results" / "mine", "--no-plots")
    assert inside.returncode == 2 and "inside the repository's" in inside.stderr, inside.stderr
    # --collect into foreign records without --out copies nothing before refusing
    collecting = script(tmp_path, "--collect", sweep / "bn-n32-s0", "--records", tmp_path / "new",
                        "--no-plots")
    assert collecting.returncode == 2 and not (tmp_path / "new").exists()
    # no file of results/ written, none added (results/fmnist.md is the repository's own table)
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "results").rglob("*") if p.is_file()} == before
    assert not (ROOT / "results" / "mine").exists()


def _recorded(tmp_path: Path, errors: dict) -> Path:
    """Runs of {(norm, n): (top-1 err of seed 0, of seed 1, ...)} written under tmp_path/runs and collected into
    tmp_path/records; returns the runs folder."""
    runs = tmp_path / "runs"
    for (norm, n), errs in errors.items():
        for seed, err in enumerate(errs):
            write_run(runs, f"{norm}-n{n}-s{seed}", norm=norm, norm_batch=n, seed=seed, top1=100.0 - err)
    collect(sorted(runs.iterdir()), tmp_path / "records")
    return runs


def test_paper_claims_are_checked_at_n_1_too_when_the_table_has_it(tmp_path):
    errors = {("bn", 1): (40.0, 42.0), ("bn", 2): (9.0, 9.2), ("bn", 32): (8.5, 8.7), ("mabn", 1): (8.3, 8.5),
              ("mabn", 2): (8.1, 8.1)}
    _recorded(tmp_path, errors)
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    section = text.split("The same claims at n = 1:")[1].split("## ")[0]
    assert ("- BN@1 worse than BN@32 beyond the seed spread: **yes** — bn@1 41.00 ± 1.41 vs bn@32 8.60 ± 0.14: "
            "gap +32.40, spread 1.56.") in section
    assert ("- MABN@1 within the seed spread of BN@32: **yes** — mabn@1 8.40 ± 0.14 vs bn@32 8.60 ± 0.14: "
            "gap -0.20, spread 0.28.") in section
    assert "BRN@1" not in section  # no brn cells: left out
    assert "- BN@2 worse than BN@32 beyond the seed spread: **yes** — bn@2 9.10 ± 0.14" in text.split(section)[0]
    # without n = 1 cells, no such paragraph
    for seed in range(2):
        (tmp_path / "records" / "fmnist" / f"bn-n1-s{seed}" / "summary.json").unlink()
        (tmp_path / "records" / "fmnist" / f"mabn-n1-s{seed}" / "summary.json").unlink()
    assert "The same claims at n = 1" not in render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])


def test_paper_claims_are_checked_from_the_records(tmp_path):
    errors = {("bn", 2): (18.0, 19.0, 20.0), ("bn", 32): (10.0, 10.5, 11.0),
              ("mabn", 2): (10.25, 10.75, 11.25), ("brn", 2): (14.0, 15.0, 16.0)}
    runs = _recorded(tmp_path, errors)
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    section = text.split("## The MABN paper's claims, checked on these records")[1].split("## Reported")[0]
    assert ("- BN@2 worse than BN@32 beyond the seed spread: **yes** — "
            "bn@2 19.00 ± 1.00 vs bn@32 10.50 ± 0.50: "
            "gap +8.50, spread 1.50.") in section
    assert ("- MABN@2 within the seed spread of BN@32: **yes** — "
            "mabn@2 10.75 ± 0.50 vs bn@32 10.50 ± 0.50: "
            "gap +0.25, spread 1.00.") in section
    assert ("- BRN@2 between BN@2 and MABN@2 (means): **yes** — "
            "brn@2 15.00 ± 1.00; bn 19.00, mabn 10.75.") in section
    # a claim the records contradict says no; one without two seeds per cell says it is not checked
    for seed in range(3):
        (tmp_path / "records" / "fmnist" / f"mabn-n2-s{seed}" / "summary.json").write_text(json.dumps(
            {**json.loads((runs / f"mabn-n2-s{seed}" / "summary.json").read_text()), "top1": 70.0 + seed}))
    (tmp_path / "records" / "fmnist" / "bn-n32-s1" / "summary.json").unlink()
    (tmp_path / "records" / "fmnist" / "bn-n32-s2" / "summary.json").unlink()
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    assert ("- BN@2 worse than BN@32 beyond the seed spread: **not checked** — needs two finished seeds in "
            "each of its cells; finished: bn@2 3, bn@32 1.") in text
    assert "- MABN@2 within the seed spread of BN@32: **not checked**" in text
    (tmp_path / "records" / "fmnist" / "bn-n32-s0" / "summary.json").unlink()  # a missing cell: left out
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    assert "BN@2 worse than BN@32" not in text and "MABN@2 within" not in text
    assert ("- BRN@2 between BN@2 and MABN@2 (means): **no** — "
            "brn@2 15.00 ± 1.00; bn 19.00, mabn 29.00.") in text


def test_ablation_variants_get_rows_of_their_own(tmp_path):
    """Non-default switches in norm_params make a row of their own, named by them; the published method's
    row (and the claims, the papers' columns) stay the plain norm's; records without switches are unchanged."""
    runs, mabn = tmp_path / "runs", {"window": 16, "weight_centering": True}
    write_run(runs, "bn", norm="bn", norm_batch=2, seed=0, top1=90.0, norm_params={"eps": 1e-5})
    write_run(runs, "mabn-old", norm="mabn", norm_batch=2, seed=0, top1=92.0, norm_params=mabn)
    write_run(runs, "mabn", norm="mabn", norm_batch=2, seed=1, top1=92.5,
              norm_params={**mabn, "forward_stat": "sma", "backward_stat": "sma", "average": "sma", "renorm": True})
    write_run(runs, "mabn-bwd", norm="mabn", norm_batch=2, seed=0, top1=91.0,
              norm_params={**mabn, "backward_stat": "batch", "renorm": False})
    write_run(runs, "mabn-wc", norm="mabn", norm_batch=2, seed=0, top1=89.0,
              norm_params={**mabn, "weight_centering": False})
    collect(sorted(runs.iterdir()), tmp_path / "records")
    records = load_tables(tmp_path / "records")["fmnist"]
    grid = cells(records)
    assert [(c.label, len(c.runs)) for c in grid] == [
        ("bn", 1), ("mabn", 2), ("mabn [backward_stat=batch, renorm=false]", 1),
        ("mabn [weight_centering=false]", 1)]
    md = render_table("fmnist", records)
    assert "| mabn [weight_centering=false] | 11.00 (1) |" in md
    assert "| mabn | 2 | 7.75 ± 0.35 (2) | 2 | 23.67 |" in md
    assert "| mabn [backward_stat=batch, renorm=false] | 2 | 9.00 (1) | 1 |  |" in md


def test_ablation_claims_say_what_each_switch_does(tmp_path):
    """Each ablated row against mabn at its n, the n = 32 control seed by seed, and the centering verdict."""
    runs, mabn = tmp_path / "runs", {"window": 16, "weight_centering": True}
    rows = {("bn", 32, None): (16.0, 16.5, 17.0), ("mabn", 32, None): (14.0, 14.5, 15.0),
            ("mabn", 2, None): (15.0, 15.25, 15.5),
            ("mabn", 2, (("backward_stat", "batch"),)): (18.0, 19.0, 20.0),
            ("mabn", 2, (("forward_stat", "batch"),)): (15.0, 15.5, 16.0),
            ("mabn", 32, (("forward_stat", "batch"), ("backward_stat", "batch"))): (14.0, 14.5, 15.0),
            ("mabn", 32, (("weight_centering", False),)): (16.0, 16.5, 17.25)}
    for (norm, n, switches), errs in rows.items():
        for seed, err in enumerate(errs):
            params = {**mabn, **dict(switches or ())} if norm == "mabn" else {}
            name = f"{norm}-{'-'.join(k for k, _ in switches or ())}-n{n}-s{seed}"
            write_run(runs, name, norm=norm, norm_batch=n, seed=seed, top1=100.0 - err, norm_params=params)
    collect(sorted(runs.iterdir()), tmp_path / "records")
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    section = text.split("## What each part of MABN does, checked on these records")[1].split("## Reported")[0]
    assert ("- mabn [backward_stat=batch]@2 worse than mabn@2 beyond the seed spread: **yes** — 19.00 ± 1.00 vs "
            "15.25 ± 0.25: gap +3.75, spread 1.25.") in section
    assert "- mabn [forward_stat=batch]@2 worse than mabn@2 beyond the seed spread: **no** — 15.50 ± 0.50" in section
    assert ("- Control: mabn [forward_stat=batch, backward_stat=batch]@32 equals mabn@32 seed by seed (a window "
            "of one batch): **yes** (3 seeds).") in section
    assert "- mabn@32 better than bn@32 beyond the seed spread: **yes** — 14.50 ± 0.50 vs 16.50 ± 0.50" in section
    from mabn.results import _better
    assert _better(-2.0, 1.0) == "no (worse beyond the spread)" and _better(0.5, 1.0) == "no"
    explains = "- What explains mabn@32 beating bn@32: "
    assert explains + "**the weight centering (without it mabn is at bn's level)**" in section
    # without centering mabn stays where it was: centering does not explain it; a control that differs says no
    for seed, err in enumerate((14.25, 14.75, 15.0)):
        rec = tmp_path / "records" / "fmnist" / f"mabn-weight_centering-n32-s{seed}" / "summary.json"
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "top1": 100.0 - err}))
    rec = tmp_path / "records" / "fmnist" / "mabn-forward_stat-backward_stat-n32-s1" / "summary.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "top1": 80.0}))
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    assert explains + "**not the weight centering (without it mabn stays at its level)" in text
    assert "equals mabn@32 seed by seed (a window of one batch): **no** (3 seeds)." in text
    for seed, err in enumerate((15.25, 15.5, 15.75)):  # without centering: between mabn (14.5) and bn (16.5)
        rec = tmp_path / "records" / "fmnist" / f"mabn-weight_centering-n32-s{seed}" / "summary.json"
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "top1": 100.0 - err}))
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    assert explains + "**partly the weight centering: without it mabn keeps part of its edge over bn**" in text
    # mabn without centering worse than bn; bn with centered filters at bn's level, better than mabn, at mabn's
    for seed, err in enumerate((19.0, 19.5, 20.0)):
        rec = tmp_path / "records" / "fmnist" / f"mabn-weight_centering-n32-s{seed}" / "summary.json"
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "top1": 100.0 - err}))
    cases = [("at bn's level", (16.25, 16.5, 16.75), "not the weight centering alone"),
             ("better than mabn", (13.25, 13.5, 13.75), "the weight centering: bn with centered filters does as "
                                                         "well as mabn or better"),
             ("at mabn's level", (14.25, 14.5, 14.75), "the weight centering: bn with centered filters does as "
                                                        "well as mabn**")]
    for case, (label, errs, verdict) in enumerate(cases):
        for seed, err in enumerate(errs):
            shutil.rmtree(tmp_path / "records" / "fmnist" / f"bn-wc{case - 1}-n32-s{seed}", ignore_errors=True)
            write_run(tmp_path / "records" / "fmnist", f"bn-wc{case}-n32-s{seed}", norm="bn", norm_batch=32,
                      seed=seed, top1=100.0 - err, norm_params={"weight_centering": True})
            shutil.rmtree(tmp_path / "records" / "fmnist" / f"bn-wc{case}-n32-s{seed}" / "checkpoints")
        text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
        assert f"- bn [weight_centering=true]@32: {sum(errs) / 3:.2f} ± 0.25" in text and f"**{label}**." in text
        assert "- mabn [weight_centering=false]@32: 19.50 ± 0.50" in text and "**worse than bn**." in text
        assert explains + "**" + verdict in text


def test_a_schedule_sweep_gets_a_row_per_setting_and_each_is_checked_against_bn(tmp_path):
    """fmnist_brn_schedule: brn rows split by schedule_ref_iters, r_max, d_max (not ablation switches); each
    row against bn at its n, and a control that equals bn seed by seed is named."""
    runs = tmp_path / "runs"
    brn = {"r_max": 3.0, "d_max": 5.0, "schedule_ref_iters": 50000}
    rows = {("bn", None): (18.0, 18.5, 19.0), ("brn", ()): (19.5, 20.0, 20.5),
            ("brn", (("schedule_ref_iters", None),)): (18.0, 18.5, 19.0),
            ("brn", (("d_max", 0),)): (18.25, 18.5, 19.25)}
    for (norm, changed), errs in rows.items():
        params = {**brn, **dict(changed)} if changed is not None else {}
        for seed, err in enumerate(errs):
            write_run(runs, f"{norm}-{changed}-s{seed}", norm=norm, norm_batch=2, seed=seed, top1=100.0 - err,
                      norm_params=params, experiment="fmnist_brn_schedule")
    collect(sorted(runs.iterdir()), tmp_path / "records")
    records = load_tables(tmp_path / "records")["fmnist_brn_schedule"]
    assert sorted(c.label for c in cells(records)) == [
        "bn", "brn [schedule_ref_iters=50000, r_max=3.0, d_max=0]",
        "brn [schedule_ref_iters=50000, r_max=3.0, d_max=5.0]", "brn [schedule_ref_iters=null, r_max=3.0, d_max=5.0]"]
    text = render_table("fmnist_brn_schedule", records)
    section = text.split("## Each setting against bn, checked on these records")[1].split("## Reported")[0]
    assert ("- brn [schedule_ref_iters=50000, r_max=3.0, d_max=5.0]@2 worse than bn@2 beyond the seed spread: "
            "**yes** — 20.00 ± 0.50 vs 18.50 ± 0.50: gap +1.50, spread 1.00.") in section
    assert ("- brn [schedule_ref_iters=null, r_max=3.0, d_max=5.0]@2 worse than bn@2 beyond the seed spread: **no** "
            "— 18.50 ± 0.50 vs 18.50 ± 0.50: gap +0.00, spread 1.00. It equals bn seed by seed.") in section
    assert "d_max=0]@2 worse than bn@2 beyond the seed spread: **no** — 18.67" in section
    assert "It equals bn seed by seed" not in section.split("d_max=0]@2")[1].split("\n")[0]
    assert "What each part of MABN does" not in text


def test_settling_compares_each_cells_last_epoch_change_with_its_seed_spread(tmp_path):
    runs = tmp_path / "runs"
    # bn@2: the error falls 2 points in the last epoch, seeds spread 0.5; mabn@2: 0.1 points, spread 1.0
    curves = {("bn", 2): ((80.0, 88.0, 90.0), (80.5, 88.5, 90.5)),
              ("mabn", 2): ((85.0, 90.9, 91.0), (85.0, 92.3, 92.4))}
    for (norm, n), seeds in curves.items():
        for seed, accs in enumerate(seeds):
            run = write_run(runs, f"{norm}-n{n}-s{seed}", norm=norm, norm_batch=n, seed=seed, top1=accs[-1])
            (run / "metrics.jsonl").write_text("".join(
                json.dumps({"iter": 10 * epoch, "epoch": epoch, "val/top1": acc}) + "\n"
                for epoch, acc in enumerate(accs, 1)))
    collect(sorted(runs.iterdir()), tmp_path / "records")
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    section = text.split("## Has training settled?")[1].split("## Reported")[0]
    assert "| bn | 2 | -2.00 (2) | 0.35 |" in section
    assert "| mabn | 2 | -0.10 (2) | 0.99 |" in section
    assert "In 1 of the 2 cells with two or more seeds the last epoch changed the error by more" in section
    # one seed left: nothing to judge against; one evaluation per run (an iteration protocol): no section
    for seed_dir in (tmp_path / "records" / "fmnist").glob("*-s1"):
        (seed_dir / "summary.json").unlink()
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    assert "| bn | 2 | -2.00 (1) | (1 run) |" in text and "No cell holds two finished seeds yet" in text
    for metrics in (tmp_path / "records" / "fmnist").glob("*/metrics.jsonl"):
        metrics.write_text(json.dumps({"iter": 10, "val/top1": 90.0}) + "\n")
    assert "Has training settled?" not in render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])


def test_provenance_names_every_commit_a_resumed_run_trained_on(sweep, tmp_path):
    summary = sweep / "bn-n32-s0" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "git_sha": "def456",
                                   "starts": [{"started": "t0", "git_sha": "abc123"},
                                              {"started": "t1", "git_sha": "def456"}]}))
    collect(sorted(p for p in sweep.iterdir() if (p / "summary.json").exists()), tmp_path / "records")
    text = render_table("fmnist", load_tables(tmp_path / "records")["fmnist"])
    assert "- commit (runs): abc123 (5), abc123 then def456 (1)" in text


def _long_and_short(root: Path, long_top1: dict) -> Path:
    """records/fmnist (3 epochs: two seeds of bn@2, bn@32, mabn@2, one of brn@2) and records/fmnist_long
    (6 epochs: the cells in long_top1, {(norm, n): top-1 of seed 0 or a tuple of seed 0, 1, ...})."""
    runs = root / "runs"
    short = {("bn", 2): (90.0, 91.0), ("bn", 32): (92.0, 92.5), ("mabn", 2): (92.5, 92.4), ("brn", 2): (89.0,)}
    for (norm, n), accs in short.items():
        for seed, top1 in enumerate(accs):
            write_run(runs, f"{norm}-n{n}-s{seed}", norm=norm, norm_batch=n, seed=seed, top1=top1)
    for (norm, n), top1s in long_top1.items():
        for seed, top1 in enumerate(top1s if isinstance(top1s, tuple) else (top1s,)):
            write_run(runs, f"long-{norm}-n{n}-s{seed}", norm=norm, norm_batch=n, seed=seed, top1=top1, epochs=6,
                      experiment="fmnist_long")
    shutil.rmtree(root / "records", ignore_errors=True)
    collect(sorted(runs.iterdir()), root / "records")
    shutil.rmtree(runs)
    make_tables(root / "records", root / "results", plots=False)
    return root / "results"


def test_a_longer_table_sets_each_cell_and_the_claims_gaps_beside_the_shorter_one(tmp_path):
    out = _long_and_short(tmp_path, {("bn", 2): 93.0, ("bn", 32): 93.5, ("mabn", 2): 93.1, ("brn", 2): 92.0})
    # one seed per 6-epoch cell: the shorter page names the longer one, whose claims cannot be judged yet
    short_page = (out / "fmnist.md").read_text()
    assert "## The same claims at 6 epochs (`fmnist_long.md`)" in short_page
    assert "- BN@2 worse than BN@32 beyond the seed spread: **not checked** — needs two finished seeds" in short_page
    text = (out / "fmnist_long.md").read_text()
    section = text.split("## Against `fmnist.md`: the same cells and seeds at 3 epochs")[1].split("## Reported")[0]
    for row in ("| norm | n | seeds | 3 epochs | 6 epochs | change |", "| bn | 2 | 1 | 10.00 | 7.00 | -3.00 |",
                "| bn | 32 | 1 | 8.00 | 6.50 | -1.50 |", "| mabn | 2 | 1 | 7.50 | 6.90 | -0.60 |",
                "| brn | 2 | 1 | 11.00 | 8.00 | -3.00 |"):
        assert row in section
    # spreads of the 3-epoch table: bn@2 0.71 + bn@32 0.35 = 1.06; mabn@2 0.07 + bn@32 0.35 = 0.42
    assert "- bn@2 − bn@32: +2.00 at 3 epochs, +0.50 at 6 epochs (1 seed): moved beyond the spread 1.06." in section
    assert "- mabn@2 − bn@32: -0.50 at 3 epochs, +0.40 at 6 epochs (1 seed): moved beyond the spread 0.42." in section
    assert ("- brn@2 − bn@2: +1.00 at 3 epochs, +1.00 at 6 epochs (1 seed): no spread to judge by (fewer than "
            "two seeds in the shorter table).") in section
    assert "**2 of 2 gaps moved beyond the spread**: the comparison at 3 epochs had not settled." in section
    # gaps within the spreads (bn@2 − bn@32 +2.50, mabn@2 − bn@32 -0.30): the comparison holds
    text = (_long_and_short(tmp_path, {("bn", 2): 91.0, ("bn", 32): 93.5, ("mabn", 2): 93.8}) / "fmnist_long.md")
    text = text.read_text()
    assert "- bn@2 − bn@32: +2.00 at 3 epochs, +2.50 at 6 epochs (1 seed): within the spread 1.06." in text
    assert "- mabn@2 − bn@32: -0.50 at 3 epochs, -0.30 at 6 epochs (1 seed): within the spread 0.42." in text
    assert "brn@2 − bn@2" not in text
    assert ("**0 of 2 gaps moved beyond the spread**: the comparison at 3 epochs holds at 6 epochs, as far as "
            "these seeds show.") in text
    # no seed at both lengths yet
    text = (_long_and_short(tmp_path, {("gn", 2): 91.0}) / "fmnist_long.md").read_text()
    assert "No cell has finished at both lengths on the same seed yet." in text and "| gn | 2 | 1 |" not in text


def test_the_shorter_page_checks_the_claims_on_the_longer_table_right_after_its_own(tmp_path):
    # 6-epoch errors: bn@2 7.0/6.8, bn@32 6.5/6.7, mabn@2 6.6/6.4, brn@2 6.9/6.9 (stds 0.14, 0.14, 0.14, 0)
    out = _long_and_short(tmp_path, {("bn", 2): (93.0, 93.2), ("bn", 32): (93.5, 93.3), ("mabn", 2): (93.4, 93.6),
                                     ("brn", 2): (93.1, 93.1)})
    text = (out / "fmnist.md").read_text()
    own, rest = text.split("## The same claims at 6 epochs (`fmnist_long.md`)")
    assert "## The MABN paper's claims, checked on these records" in own
    section = rest.split("## Has training settled?")[0]  # before this table's settling section
    assert "its 8 records" in section and "epochs 6" in section
    assert ("- BN@2 worse than BN@32 beyond the seed spread: **yes** — bn@2 6.90 ± 0.14 vs bn@32 6.60 ± 0.14: "
            "gap +0.30, spread 0.28.") in section
    assert ("- MABN@2 within the seed spread of BN@32: **yes** — mabn@2 6.50 ± 0.14 vs bn@32 6.60 ± 0.14: "
            "gap -0.10, spread 0.28.") in section
    assert "- BRN@2 between BN@2 and MABN@2 (means): **no** — brn@2 6.90 ± 0.00; bn 6.90, mabn 6.50." in section
    # the 3-epoch verdicts above it are this table's own (bn@2 9.50 vs bn@32 7.75)
    assert "- BN@2 worse than BN@32 beyond the seed spread: **yes** — bn@2 9.50 ± 0.71" in own
    assert "## The same claims at" not in (out / "fmnist_long.md").read_text()
