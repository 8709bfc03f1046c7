#!/usr/bin/env python
"""Generate results/<table>.md and its plots from the run records in results/records/<table>/.

    python scripts/make_tables.py                                   # every table, from results/records
    python scripts/make_tables.py --collect runs/fmnist-*           # first copy finished runs' records in
    python scripts/make_tables.py --collect runs/x-* --table mine   # ... into records/mine/ (default: the
                                                                    #     experiment the run was started with)

A table shows, per norm x normalization batch, the mean ± std over seeds and the number of runs of the
records' final metric (top-1 error, or box/mask AP), then the papers' reported numbers in their own labelled
columns, the hardware, commits and commands of the records, and two figures (PNG + SVG). It writes no number
that is not in a record or, labelled, in mabn/papers.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mabn.results import collect, make_tables  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=Path("results/records"), help="records root")
    parser.add_argument("--out", type=Path, default=Path("results"), help="where <table>.md and figures/ go")
    parser.add_argument("--collect", type=Path, nargs="*", default=[], metavar="RUN_DIR",
                        help="copy these runs' records (summary.json, metrics.jsonl, config) in first")
    parser.add_argument("--table", help="the table --collect files runs under (default: their experiment)")
    parser.add_argument("--no-plots", action="store_true", help="markdown only")
    args = parser.parse_args(argv)
    try:
        for dest in collect(args.collect, args.records, args.table):
            print(f"recorded {dest}")
        if not args.records.is_dir():
            raise FileNotFoundError(f"no records folder {args.records} (run with --collect RUN_DIR ...)")
        written = make_tables(args.records, args.out, plots=not args.no_plots)
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
