#!/usr/bin/env python
"""Generate results/<table>.md and its plots from the run records in results/records/<table>/.

    python scripts/make_tables.py                                   # every table, from results/records
    python scripts/make_tables.py --collect runs/fmnist-*           # first copy finished runs' records in
    python scripts/make_tables.py --collect runs/x-* --table mine   # ... into records/mine/ (default: the
                                                                    #     experiment the run was started with)
    python scripts/make_tables.py --records /elsewhere --out /tmp/t # other records: --out is required

A table shows, per norm x normalization batch, the mean ± std over seeds and the number of runs of the
records' final metric (top-1 error, or box/mask AP), then the papers' reported numbers in their own labelled
columns, the hardware, commits and commands of the records, and two figures (PNG + SVG). It writes no number
that is not in a record or, labelled, in mabn/papers.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mabn.results import collect, make_tables

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, wherever this runs from


def _is_within(path: Path, root: Path) -> bool:
    return path.resolve() == root.resolve() or root.resolve() in path.resolve().parents


def output_dir(records: Path, out: Path | None) -> Path:
    """Where the tables go: the repository's results/ only for its own records, else the --out given."""
    own = records.resolve() == (RESULTS / "records").resolve()
    if out is None:
        if own:
            return RESULTS
        raise ValueError(f"--out is required with --records {records} (not this repository's "
                         f"{RESULTS / 'records'}): the tables would otherwise overwrite {RESULTS}")
    if not own and _is_within(out, RESULTS):
        raise ValueError(f"--out {out} is inside the repository's {RESULTS}, which holds only tables of "
                         f"{RESULTS / 'records'}; --records {records} is elsewhere: pass another --out")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=RESULTS / "records",
                        help="records root (default: this repository's results/records)")
    parser.add_argument("--out", type=Path, help="where <table>.md and figures/ go (default: this "
                        "repository's results/, only for its own records: required with any other --records)")
    parser.add_argument("--collect", type=Path, nargs="*", default=[], metavar="RUN_DIR",
                        help="copy these runs' records (summary.json, metrics.jsonl, config) in first")
    parser.add_argument("--table", help="the table --collect files runs under (default: their experiment)")
    parser.add_argument("--no-plots", action="store_true", help="markdown only")
    args = parser.parse_args(argv)
    try:
        out = output_dir(args.records, args.out)  # before --collect copies anything in
        for dest in collect(args.collect, args.records, args.table):
            print(f"recorded {dest}")
        if not args.records.is_dir():
            raise FileNotFoundError(f"no records folder {args.records} (run with --collect RUN_DIR ...)")
        written = make_tables(args.records, out, plots=not args.no_plots)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print(f"error: no summary.json under {args.records}/<table>/", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
