"""Fine-tune on grocery `train`, select on `val`, then score the grocery protocol with the trained model.

    python benchmarks/train_grocery.py --data ../shared/datasets/grocery_store --time-limit 40

`experiment()` is also what benchmarks/train_ablation.py runs for each row of its table.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from lookalike import Extractor
from lookalike.formats import write_labels
from lookalike.metrics import retrieval_metrics
from lookalike.postprocess import knn
from lookalike.train import TrainConfig, train


def experiment(data: str, run: str, **train_options) -> dict:
    """Train on `train` (selection on `val`), extract everything, score `test` against the gallery."""
    root = Path(data).resolve()
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    write_labels(run / "train.csv", {str(root / r["path"]): r["class_id"] for r in rows if r["split"] == "train"})
    write_labels(run / "val.csv", {str(root / r["path"]): r["class_id"] for r in rows if r["split"] == "val"})
    t0 = time.perf_counter()
    cfg = TrainConfig(data=str(run / "train.csv"), output=str(run / "model"), val_data=str(run / "val.csv"),
                      patience=0, **train_options)
    best = train(cfg, resume=(run / "model" / "checkpoint.pt").exists())
    t_train = time.perf_counter() - t0
    print(f"training: {t_train / 60:.1f} min; best epoch {best.get('epoch')} val score {best.get('val_score'):.4f}", flush=True)
    listing = run / "all.txt"
    listing.write_text("".join(f"{root / r['path']}\n" for r in rows))
    ex = Extractor(model=str(run / "model"), image_size=cfg.image_size)
    res = ex.extract(listing, run / "features.h5")
    pos = {n: i for i, n in enumerate(res.names)}
    q = [r for r in rows if r["split"] == "test"]
    g = [r for r in rows if r["split"] in ("train", "val", "iconic")]
    qf = res.features[[pos[str(root / r["path"])] for r in q]]
    gf = res.features[[pos[str(root / r["path"])] for r in g]]
    ql, gl = np.array([r["class_id"] for r in q]), np.array([r["class_id"] for r in g])
    _, ids = knn(qf, gf, 10)
    m = retrieval_metrics(gl[ids] == ql[:, None], np.array([(gl == lab).sum() for lab in ql]))[0]
    wall = (time.perf_counter() - t0) / 60
    print(f"grocery protocol with the trained model: top-1 {m['top1']:.4f} mAP@10 {m['mAP@10']:.4f} "
          f"score {m['digix_score']:.4f} (wall {wall:.1f} min in all)", flush=True)
    return {"train_minutes": t_train / 60, "wall_minutes": wall, "best_epoch": best.get("epoch"),
            "val_score": best.get("val_score"), "top1": m["top1"], "mAP@10": m["mAP@10"], "score": m["digix_score"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/grocery_store")
    ap.add_argument("--run", default="bench-out/train-grocery")
    ap.add_argument("--time-limit", type=float, default=40)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--loss", default="cosface")
    ap.add_argument("--descriptors", default="SMG")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sampler", default="random")
    ap.add_argument("--no-augment", action="store_true")
    args = ap.parse_args()
    experiment(args.data, args.run, loss=args.loss, descriptors=args.descriptors, image_size=args.image_size,
               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, time_limit=args.time_limit,
               sampler=args.sampler, augment=not args.no_augment)


if __name__ == "__main__":
    main()
