"""Execute one chapter as the book build does, and print where its time goes.

    .venv/bin/python tools/run_chapter.py book/02_thresholds.md [--out /tmp/ch2.ipynb]

Runs the MyST notebook with nbclient (what myst-nb uses) from the chapter's folder, so relative
paths resolve as in `make book`; prints the slowest cells and the total. Fails like the book
build does when a cell fails.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapter", type=Path)
    ap.add_argument("--out", type=Path, help="write the executed notebook here")
    ap.add_argument("--timeout", type=int, default=1800, help="per-cell timeout, as in _config.yml")
    args = ap.parse_args()

    nb = jupytext.read(args.chapter)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(args.chapter.parent.resolve())}})
    times = []
    original = client.async_execute_cell

    async def timed(cell, index, **kw):  # wrap each cell to time it
        t = time.perf_counter()
        try:
            return await original(cell, index, **kw)
        finally:
            times.append((time.perf_counter() - t, index, cell.source.splitlines()[0][:70] if cell.source else ""))

    client.async_execute_cell = timed
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        total = time.perf_counter() - t0
        for dt, i, head in sorted(times, reverse=True)[:8]:
            print(f"{dt:8.1f} s  cell {i:3d}  {head}")
        print(f"{args.chapter}: {total:.0f} s in total ({len(times)} cells run)")
        if args.out:
            jupytext.write(nb, args.out)


if __name__ == "__main__":
    main()
