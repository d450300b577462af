"""Ablation on grocery: loss, head and augmentation, each row trained with the same step budget.

    python benchmarks/train_ablation.py --data ../shared/datasets/grocery_store --epochs 2

Every row trains for the same number of epochs (a step budget, not a time budget, so a noisy shared
machine cannot favour one row), then is scored on the grocery protocol exactly like
benchmarks/train_grocery.py. Finished rows are kept in OUT/ablation.json, so a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_grocery import experiment  # noqa: E402

ROWS = {
    "cosface + CGD SMG + aug (reference)": {},
    "arcface + CGD SMG + aug": {"loss": "arcface"},
    "multi-similarity (P x K 8x4) + CGD SMG + aug": {"loss": "multisimilarity", "sampler": "pk", "pk_k": 4},
    "cosface + GeM only + aug": {"descriptors": "G"},
    "cosface + CGD SMG, no augmentation": {"augment": False},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/grocery_store")
    ap.add_argument("--out", default="bench-out/ablation")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "ablation.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    for i, (name, opts) in enumerate(ROWS.items()):
        if name in done:
            continue
        print(f"== {name}", flush=True)
        done[name] = experiment(args.data, str(out / f"row{i}"), epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                                **opts)
        done_path.write_text(json.dumps(done, indent=1))
    print("\n| row | top-1 | mAP@10 | score | val score | train min |\n|---|---|---|---|---|---|")
    for name, m in done.items():
        print(f"| {name} | {m['top1']:.4f} | {m['mAP@10']:.4f} | {m['score']:.4f} | {m['val_score']:.4f} | "
              f"{m['train_minutes']:.1f} |")


if __name__ == "__main__":
    main()
