"""Backbones, input sizes, poolings and ensembles on both dev protocols (books and grocery).

Each single-model configuration is extracted once over the 5,704 images of both protocols (the real
``lookalike.Extractor`` path, stores cached in --workdir, so a rerun only scores); its rate is the
end-to-end images/s of that extraction (decode + preprocess + inference on this machine, 2 cores).
Ensembles are scored from their members' stores (weighted concatenation of L2-normalised rows,
exactly what the extractor computes: tests/test_extract.py) and their rate is the harmonic
combination of the members' rates (each photo goes through every member).

    python benchmarks/backbones.py --workdir /work/bench-feats
    python benchmarks/backbones.py --only "lite0 spoc 224" "sscd 288 bucket" --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from protocols import features_for, protocols, write_listing  # noqa: E402

from lookalike import Extractor  # noqa: E402
from lookalike.postprocess import knn, l2n  # noqa: E402
from lookalike.store import read_attrs, read_store  # noqa: E402

SINGLE = {
    "lite0 spoc 224": dict(model="lite0"),
    "lite0 gem 224": dict(model="lite0", pooling="gem"),
    "lite0 spoc 288": dict(model="lite0", image_size=288),
    "lite0 spoc 224 tta": dict(model="lite0", tta="flip,multiscale"),
    "lite1 spoc 240": dict(model="lite1", image_size=240),
    "lite2 spoc 260": dict(model="lite2", image_size=260),
    "sscd 288 bucket": dict(model="sscd"),
    "sscd 288 letterbox": dict(model="sscd", resize="letterbox"),
    "sscd 224 bucket": dict(model="sscd", image_size=224),
    "sscd 352 bucket": dict(model="sscd", image_size=352),
    "sscd 288 bucket tta flip": dict(model="sscd", tta="flip"),
    "sscd-mobile 288 bucket": dict(model="sscd-mobile"),
    "sscd-mobile 352 bucket": dict(model="sscd-mobile", image_size=352),
}
# (members, weights): Lite0 first
ENSEMBLES = {
    f"lite0 ⊕ {s} (Lite0 weight {w:g})": (("lite0 spoc 224", f"{s} 288 bucket"), (w, 1.0))
    for s in ("sscd", "sscd-mobile") for w in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
}


def extract_config(name: str, over: dict, listing: Path, work: Path) -> tuple[list[str], np.ndarray, float]:
    ex = Extractor(**over)
    store = work / f"{ex.config.fingerprint()}.h5"
    rate_file = store.with_suffix(".rate.json")
    if store.exists() and rate_file.exists():
        s = read_store(store)
        return s.names, s.features, json.loads(rate_file.read_text())["images_per_s"]
    t0 = time.perf_counter()
    res = ex.extract(listing, store, progress=False)
    rate = res.n_extracted / (time.perf_counter() - t0) if res.n_extracted else float("nan")
    rate_file.write_text(json.dumps({"images_per_s": rate, "config": name, "attrs": str(read_attrs(store).get("model"))}))
    return res.names, res.features, rate


def score_all(names, feats) -> dict:
    """Score on both protocols, without and with the default whitening (fitted on each gallery)."""
    from lookalike.postprocess import PCAWhitening

    out = {}
    for p in protocols():
        q, g = features_for(names, feats, p)
        out[p.name] = p.score(knn(q, g, 10)[1])["digix_score"]
        w = PCAWhitening().fit(g)
        out[p.name + " +wh"] = p.score(knn(w.transform(q), w.transform(g), 10)[1])["digix_score"]
    return out


def _print(name, r, base_rate):
    print(f"{name:48s} {r['books']:7.3f} {r['books +wh']:6.3f} {r['grocery']:7.3f} {r['grocery +wh']:6.3f} "
          f"{r['images_per_s']:7.1f} {r['images_per_s'] / base_rate:8.2f}", flush=True)


SPEED = {"lite0 spoc 224": dict(model="lite0"), "sscd-mobile 288 bucket": dict(model="sscd-mobile"),
         "sscd 288 bucket": dict(model="sscd"), "default: lite0 ⊕ sscd": {},
         "lite0 ⊕ sscd-mobile": dict(model=("lite0", "sscd-mobile"))}


def speed(args):
    import tempfile

    from protocols import all_images

    listing = Path(tempfile.mkdtemp()) / "some.txt"
    listing.write_text("".join(f"{x}\n" for x in all_images()[: args.speed]))
    print(f"{'configuration':32s} {'img/s':>7s} {'× lite0':>8s}   ({args.speed} photos, end to end, same run)")
    base = None
    for name, over in SPEED.items():
        if args.only and name not in args.only and name != "lite0 spoc 224":
            continue
        ex = Extractor(**over)
        ex.embed_images([__import__("PIL.Image").Image.new("RGB", (64, 64))])  # build / export the models first
        t0 = time.perf_counter()
        res = ex.extract(listing, progress=False)
        rate = len(res.names) / (time.perf_counter() - t0)
        base = base or rate
        print(f"{name:32s} {rate:7.1f} {rate / base:8.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-out/backbones")
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    ap.add_argument("--no-ensembles", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--speed", type=int, default=0,
                    help="only time end-to-end extraction of the first N photos for each configuration, one after "
                         "another in this run (no cache), as ratios to Lite0")
    args = ap.parse_args()
    if args.speed:
        return speed(args)
    work = Path(args.workdir)
    listing = write_listing(work / "all_images.txt")
    print(f"{'configuration':48s} {'books':>7s} {'+wh':>6s} {'grocery':>7s} {'+wh':>6s} {'img/s':>7s} {'× lite0':>8s}")
    rows, stores = {}, {}
    base_rate = None
    for name, over in SINGLE.items():
        if args.only and name not in args.only and name != "lite0 spoc 224":
            continue
        names, feats, rate = extract_config(name, over, listing, work)
        stores[name] = (names, feats, rate)
        base_rate = base_rate or rate
        rows[name] = {**score_all(names, feats), "images_per_s": rate}
        _print(name, rows[name], base_rate)
    if not args.no_ensembles:
        for name, (members, weights) in ENSEMBLES.items():
            if any(m not in stores for m in members):
                continue
            names = stores[members[0]][0]
            parts = []
            for m, w in zip(members, weights):
                pos = {n: i for i, n in enumerate(stores[m][0])}
                parts.append(l2n(stores[m][1][[pos[n] for n in names]]) * w)
            feats = l2n(np.concatenate(parts, axis=1))
            rate = 1.0 / sum(1.0 / stores[m][2] for m in members)
            rows[name] = {**score_all(names, feats), "images_per_s": rate}
            _print(name, rows[name], base_rate)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
