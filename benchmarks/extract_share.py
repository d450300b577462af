"""End-to-end extraction as a share of the model alone, for every built-in backbone and the default
ensemble, measured in the same run.

For each model: the same photos are first decoded and prepared once (``Extractor.prepare_file``,
timed as "decode"); then, alternating ``--rounds`` times,

- model alone: ``Extractor.embed_prepared`` on those ready arrays (same shapes, batches, runner and
  threads as the pipeline uses; no file reading or decoding);
- end to end: ``Extractor.extract`` on the files (list file → L2-normalised features).

The share is end to end ÷ model alone (best round of each). Model load time is excluded (a warm-up
batch runs first).

    python benchmarks/extract_share.py --data ../shared/datasets/grocery_store --n 256
    python benchmarks/extract_share.py --models lite0,sscd-mobile --n 512 --rounds 3
    python benchmarks/extract_share.py --models lite0,sscd-mobile --old-rev f85a1ac --rounds 3

``--old-rev REV`` measures each model twice in the same run, first with the code of an earlier git
revision (a detached worktree on ``PYTHONPATH``, in a subprocess) and then with the current code
(also in a subprocess, so both start alike): old and new rows side by side.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MODELS = "lite0,sscd-mobile,sscd,lite0+sscd"


def images_from(root: Path, n: int) -> list[Path]:
    paths = sorted(p for p in root.rglob("*.jpg"))
    rng = np.random.default_rng(0)
    return [paths[i] for i in sorted(rng.choice(len(paths), min(n, len(paths)), replace=False))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/grocery_store"))
    ap.add_argument("--n", type=int, default=256, help="photos per model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma list; A+B is an ensemble")
    ap.add_argument("--old-rev", default=None, help="also measure with the code of this git revision, same run")
    ap.add_argument("--label", default=None, help=argparse.SUPPRESS)  # a row of an --old-rev run
    args = ap.parse_args()

    paths = images_from(Path(args.data), args.n)
    if args.label is None:
        print(f"{len(paths)} photos from {args.data}; {os.cpu_count()} cores; best of {args.rounds} rounds", flush=True)
        print(f"| model |{' code |' if args.old_rev else ''} decode + prepare alone img/s | model alone img/s | "
              "end to end img/s | end to end / model alone |")
        print(f"|---|{'---|' if args.old_rev else ''}---|---|---|---|")
    if args.old_rev:
        compare(args)
        return
    from lookalike.extract import Extractor

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "list.txt"
        listing.write_text("".join(f"{p.resolve()}\n" for p in paths))
        for name in args.models.split(","):
            model = tuple(name.split("+")) if "+" in name else name
            ex = Extractor(model=model)
            ex.prepare_file(paths[0])  # warm-up: imports done (torch, for the resize)
            t0 = time.perf_counter()
            prepared = [ex.prepare_file(p) for p in paths]
            decode = len(paths) / (time.perf_counter() - t0)
            ex.embed_prepared(prepared[: ex.config.batch_size])  # warm-up: sessions built, first batch run
            alone, e2e = [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                ex.embed_prepared(prepared)
                alone.append(len(paths) / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                res = ex.extract(listing, None, progress=False)
                e2e.append(len(res.names) / (time.perf_counter() - t0))
            code = f" {args.label} |" if args.label else ""
            print(f"| {name} |{code} {decode:.1f} | {max(alone):.1f} | {max(e2e):.1f} | {max(e2e) / max(alone):.0%} |",
                  flush=True)
            del ex, prepared


def compare(args):
    """Each model in two subprocesses: the code of ``--old-rev`` (a worktree), then the current code."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from oldcode import ROOT, old_source

    with old_source(args.old_rev) as old_src:
        for name in args.models.split(","):
            for label, src in ((args.old_rev, old_src), ("now", ROOT / "src")):
                subprocess.run([sys.executable, __file__, "--data", args.data, "--n", str(args.n), "--rounds",
                                str(args.rounds), "--models", name, "--label", label], check=True,
                               env={**os.environ, "PYTHONPATH": str(src)})

if __name__ == "__main__":
    main()
