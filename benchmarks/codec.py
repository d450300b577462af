"""Rate–accuracy of the feature codecs: bytes per vector -> reconstruction error, retrieval, speed.

    python benchmarks/codec.py --data ../shared/datasets/grocery_store --json bench-out/codec.json

Sets:
- grocery zero-shot (SPoC, 1280-d) and grocery trained (a `lookalike train` run, `--trained`):
  codecs fitted on the `train` photos' features (labels used by the learned codec only); scored on
  the grocery protocol (2,485 `test` queries against `train`+`val`+`iconic`) with *both* sides
  decoded, as in NAIC;
- synthetic NAIC-like: 2048-d non-negative features of many identities (identity centres in a
  512-d subspace, a shared 64-d nuisance subspace such as camera or pose, isotropic noise;
  calibrated so float32 scores ~0.78); fitted on 1,000 identities, scored leave-one-out on 400
  other identities.
Score = DIGIX score (0.5 top-1 + 0.5 mAP@10); "rel" = score / float32 score.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from lookalike.codec import Codec
from lookalike.metrics import leave_one_out, retrieval_metrics
from lookalike.postprocess import knn, l2n


def synthetic(n_ids: int, per: int, seed: int, d: int = 2048):
    rng = np.random.default_rng(1234)  # the same "world" for train and test identities
    basis = rng.normal(size=(512, d)) / np.sqrt(512)
    nuisance = rng.normal(size=(64, d)) / np.sqrt(64)
    r = np.random.default_rng(seed)
    centres = r.normal(size=(n_ids, 512)) @ basis
    # nuisance 1.5 and noise 0.25: float32 leave-one-out score ~0.78 (calibrated; 0.9 / 0.01 gave 1.000)
    x = np.repeat(centres, per, axis=0) + 1.5 * r.normal(size=(n_ids * per, 64)) @ nuisance \
        + 0.25 * r.normal(size=(n_ids * per, d))
    x = np.maximum(x, 0).astype(np.float32)
    return l2n(x), np.repeat(np.arange(n_ids), per)


def grocery(data: Path, store: Path):
    from lookalike.store import read_store

    rows = list(csv.DictReader(open(data / "labels.csv", newline="")))
    st = read_store(store)
    pos = {n: i for i, n in enumerate(st.names)}

    def key(r):
        p = str((data / r["path"]).resolve())
        return pos[p] if p in pos else pos[str(data / r["path"])]

    def part(splits):
        sel = [r for r in rows if r["split"] in splits]
        return st.features[[key(r) for r in sel]], np.array([r["class_id"] for r in sel])

    return part({"train"}), part({"test"}), part({"train", "val", "iconic"})


def protocol_score(q, ql, g, gl) -> dict:
    _, ids = knn(l2n(q), l2n(g), 10)
    return retrieval_metrics(gl[ids] == ql[:, None], np.array([(gl == lab).sum() for lab in ql]))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/grocery_store")
    ap.add_argument("--zero-shot", default=None, help="feature store of every grocery photo (default features)")
    ap.add_argument("--trained", default=None, help="feature store of every grocery photo from a trained model")
    ap.add_argument("--budgets", default="16,32,64,128,256")
    ap.add_argument("--methods", default="sq,pq,opq,learned")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--sets", default="synthetic,zero-shot,trained")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    out = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    sets = {}
    for name in args.sets.split(","):
        if name == "synthetic":
            tr, trl = synthetic(1000, 8, seed=1)
            te, tel = synthetic(400, 8, seed=2)
            sets[name] = (tr, trl, lambda f, tel=tel: leave_one_out(l2n(f), tel), te)
        else:
            store = args.zero_shot if name == "zero-shot" else args.trained
            if not store:
                continue
            (tr, trl), (q, ql), (g, gl) = grocery(Path(args.data), Path(store))
            nq = len(q)
            both = np.concatenate([q, g])
            sets[name] = (tr, trl, lambda f, nq=nq, ql=ql, gl=gl: protocol_score(f[:nq], ql, f[nq:], gl), both)
    for name, (tr, trl, score_fn, evalset) in sets.items():
        base = score_fn(evalset)
        out.setdefault(name, {})["float32"] = {"digix_score": base["digix_score"], "top1": base["top1"],
                                               "mAP@10": base["mAP@10"], "bytes": int(evalset.shape[1] * 4)}
        print(f"== {name}: {len(tr)} training vectors, {evalset.shape[1]}-d; float32 score {base['digix_score']:.4f} "
              f"({evalset.shape[1] * 4} bytes)", flush=True)
        for b in budgets:
            for m in methods:
                key = f"{m}/{b}"
                if key in out[name]:
                    continue
                if m == "sq" and b * 8 // 8 > tr.shape[1]:
                    continue
                t0 = time.perf_counter()
                try:
                    # grocery is a closed set (test classes = training classes); synthetic is open (new identities)
                    sel = "identities" if name == "synthetic" else "images"
                    c = Codec(nbytes=b, method=m, epochs=args.epochs, selection=sel).fit(tr, trl if m == "learned" else None)
                except Exception as e:  # a budget a method cannot take
                    print(f"{name} {key}: {e}")
                    continue
                t_fit = time.perf_counter() - t0
                t0 = time.perf_counter()
                codes = c.encode(evalset)
                t_enc = time.perf_counter() - t0
                t0 = time.perf_counter()
                rec = c.decode(codes)
                t_dec = time.perf_counter() - t0
                s = score_fn(rec)
                err = float((((evalset - rec) ** 2).sum(1) / (evalset ** 2).sum(1)).mean())
                row = {"digix_score": s["digix_score"], "top1": s["top1"], "mAP@10": s["mAP@10"],
                       "rel": s["digix_score"] / base["digix_score"], "relative_squared_error": err,
                       "latent_dim": int(c.latent_dim_), "fit_s": t_fit,
                       "chosen": c.history_[0].get("chosen") if c.history_ else None, "encode_per_s": len(evalset) / t_enc,
                       "decode_per_s": len(evalset) / t_dec}
                out[name][key] = row
                print(f"{name:10s} {m:8s} {b:4d} B: score {s['digix_score']:.4f} ({100 * row['rel']:.1f}%), "
                      f"rel.err {err:.4f}, latent {c.latent_dim_} ({row['chosen']}), fit {t_fit:.0f} s, encode {row['encode_per_s']:.0f}/s, "
                      f"decode {row['decode_per_s']:.0f}/s", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
