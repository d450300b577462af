"""Zero-shot retrieval quality on the Grocery Store dataset (protocol in its README).

queries = the `test` photos; gallery = `train` + `val` + `iconic`; relevant = same class_id;
score = 0.5 * top-1 + 0.5 * mAP@10 (AP@10 normalised by min(#relevant, 10)).

Runs the real extraction path (lookalike.Extractor) for each pooling, with and without TTA, plus
the naive reference (global average pooling, 224 px centre crop). Features are cached in
--workdir, so a rerun only evaluates.

    python benchmarks/quality.py --data ../shared/datasets/grocery_store
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from lookalike import Extractor
from lookalike.index import build_index
from lookalike.metrics import retrieval_metrics
from lookalike.store import FeatureStore

CONFIGS = {
    "reference: gap, centre crop 224": dict(pooling="gap", resize="crop"),
    "gap, bucket 224": dict(pooling="gap"),
    "mac, bucket 224": dict(pooling="mac"),
    "spoc, bucket 224": dict(pooling="spoc"),
    "gem, bucket 224": dict(pooling="gem"),
    "spoc, bucket 224, bf16 (openvino)": dict(pooling="spoc", precision="bf16"),
    "gap, bucket 256": dict(pooling="gap", image_size=256),
    "spoc, bucket 256": dict(pooling="spoc", image_size=256),
    "gap, bucket 288": dict(pooling="gap", image_size=288),
    "gem, bucket 288": dict(pooling="gem", image_size=288),
    "gap, bucket 320": dict(pooling="gap", image_size=320),
    "gem, bucket 320": dict(pooling="gem", image_size=320),
    "spoc, bucket 288": dict(pooling="spoc", image_size=288),
    "gap, bucket 224, tta flip+multiscale": dict(pooling="gap", tta="flip,multiscale"),
    "mac, bucket 224, tta flip+multiscale": dict(pooling="mac", tta="flip,multiscale"),
    "spoc, bucket 224, tta flip+multiscale": dict(pooling="spoc", tta="flip,multiscale"),
    "gem, bucket 224, tta flip+multiscale": dict(pooling="gem", tta="flip,multiscale"),
}


def load_protocol(root: Path):
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    q = [r for r in rows if r["split"] == "test"]
    g = [r for r in rows if r["split"] in ("train", "val", "iconic")]
    return q, g


def score(q_feats, g_feats, q_labels, g_labels, k=10):
    col = build_index(FeatureStore([str(i) for i in range(len(g_feats))], g_feats, {}))
    _, idx = col.search(q_feats, k)
    rel = g_labels[idx] == q_labels[:, None]
    n_rel = np.array([(g_labels == lab).sum() for lab in q_labels])
    summary, _ = retrieval_metrics(rel, n_rel, k)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/grocery_store")
    ap.add_argument("--workdir", default="bench-out/quality")
    ap.add_argument("--only", nargs="*", help="config names to run (default: all)")
    ap.add_argument("--json", default=None, help="also write the table as JSON")
    args = ap.parse_args()
    root = Path(args.data)
    q, g = load_protocol(root)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    listing = work / "all_images.txt"
    listing.write_text("".join(f"{(root / r['path']).resolve()}\n" for r in q + g))
    labels = {str((root / r["path"]).resolve()): r["class_id"] for r in q + g}
    q_names = [str((root / r["path"]).resolve()) for r in q]
    g_names = [str((root / r["path"]).resolve()) for r in g]
    print(f"grocery: {len(q_names)} queries, {len(g_names)} gallery")
    print(f"{'config':45s} {'top1':>7s} {'mAP@10':>7s} {'score':>7s} {'img/s':>7s}")
    results = {}
    for name, over in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        ex = Extractor(**over)
        res = ex.extract(listing, work / f"{ex.config.fingerprint()}.h5", progress=False)
        pos = {n: i for i, n in enumerate(res.names)}
        qf = res.features[[pos[n] for n in q_names]]
        gf = res.features[[pos[n] for n in g_names]]
        s = score(qf, gf, np.array([labels[n] for n in q_names]), np.array([labels[n] for n in g_names]))
        rate = res.rate if res.n_extracted else float("nan")
        results[name] = {**{k: s[k] for k in ("top1", "mAP@10", "digix_score")}, "images_per_s": rate}
        print(f"{name:45s} {s['top1']:7.3f} {s['mAP@10']:7.3f} {s['digix_score']:7.3f} {rate:7.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
