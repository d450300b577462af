"""Post-processing on the grocery protocol: tune on validation, measure once on test.

Tuning split: `val` photos as queries against `train` + `iconic` (the test photos are never used).
Test protocol (dataset README): `test` queries against `train` + `val` + `iconic`.
The best chain found by lookalike.tune is then applied to the test protocol and compared with no
post-processing. Whitening (PCA fitted on the gallery, an index option) is tried too.

    python benchmarks/postprocess_grocery.py --data ../shared/datasets/grocery_store
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lookalike import Extractor
from lookalike.metrics import retrieval_metrics
from lookalike.postprocess import PCAWhitening, RerankConfig, knn, rerank
from lookalike.tune import tune


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/grocery_store")
    ap.add_argument("--workdir", default="bench-out/quality")
    ap.add_argument("--model", default="lite0", help="lite0, or a RUN_DIR from lookalike train")
    ap.add_argument("--pooling", default="spoc")
    ap.add_argument("--tta", default="")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.data)
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    path = {id(r): str((root / r["path"]).resolve()) for r in rows}
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    listing = work / "all_images.txt"
    listing.write_text("".join(f"{path[id(r)]}\n" for r in rows))
    ex = Extractor(model=args.model, pooling=args.pooling, tta=args.tta)
    res = ex.extract(listing, work / f"{ex.config.fingerprint()}.h5", progress=False)
    pos = {n: i for i, n in enumerate(res.names)}
    feats = res.features

    def split(names):
        sel = [r for r in rows if r["split"] in names]
        return feats[[pos[path[id(r)]] for r in sel]], np.array([r["class_id"] for r in sel])

    vq, vql = split({"val"})
    vg, vgl = split({"train", "iconic"})
    tq, tql = split({"test"})
    tg, tgl = split({"train", "val", "iconic"})
    print(f"features: {args.model}, {args.pooling}{' + tta ' + args.tta if args.tta else ''}; tune: {len(vq)} val queries vs "
          f"{len(vg)} gallery; test: {len(tq)} queries vs {len(tg)} gallery")

    def test_score(cfg: RerankConfig, whiten: PCAWhitening | None = None) -> dict:
        q, g = tq, tg
        if whiten is not None:
            w = replace(whiten).fit(g)  # fitted on the test gallery (no labels), as `lookalike index --whiten` does
            q, g = w.transform(q), w.transform(g)
        t0 = time.perf_counter()
        _, ids = rerank(q, g, 10, cfg) if cfg.steps else knn(q, g, 10)
        secs = time.perf_counter() - t0
        n_rel = np.array([(tgl == lab).sum() for lab in tql])
        m = retrieval_metrics(tgl[ids] == tql[:, None], n_rel)[0]
        m["seconds"] = secs
        return m

    out = {}
    variants = [("no whitening", None)] + [(f"whitening to {d}", PCAWhitening(d, power=0.5, shrinkage=0.1)) for d in (256, 512)]
    for label, whiten in variants:
        q, g = vq, vg
        if whiten is not None:
            w = replace(whiten).fit(g)
            q, g = w.transform(q), w.transform(g)
        t0 = time.perf_counter()
        results = tune(q, g, vql, vgl)
        best, best_m = results[0]
        base_val = next(m for c, m in results if not c.steps)
        t_tune = time.perf_counter() - t0
        base = test_score(RerankConfig(), whiten)
        tuned = test_score(best, whiten)
        out[label] = {"best_chain": best.to_dict(), "val_none": base_val["digix_score"], "val_best": best_m["digix_score"],
                      "test_none": base, "test_best": tuned, "tune_seconds": t_tune, "chains_tried": len(results)}
        print(f"{label:18s} val: none {base_val['digix_score']:.4f} -> best {best_m['digix_score']:.4f} "
              f"({len(results)} chains, {t_tune:.0f} s); best = {best.to_dict()}")
        print(f"{'':18s} test: none top-1 {base['top1']:.4f} mAP@10 {base['mAP@10']:.4f} score {base['digix_score']:.4f} | "
              f"best top-1 {tuned['top1']:.4f} mAP@10 {tuned['mAP@10']:.4f} score {tuned['digix_score']:.4f} "
              f"({tuned['seconds']:.1f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
