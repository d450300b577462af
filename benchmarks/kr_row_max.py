"""k-reciprocal with and without the DIGIX 2020 winner's distance scaling, on both dev protocols.

The winner's ``fast_kr_sparse`` squares Euclidean distances (for unit rows: ``2 - 2·cos``, our
``d``) and divides each row by its largest entry before the Jaccard step and the final sum. This
runs ``k_reciprocal_rerank`` with ``row_max`` off (our default) and on, with the DIGIX defaults
(k1 20, k2 6, λ 0.3) and with the library's ``--rerank kr`` defaults, on the ``books`` (instance)
and ``grocery`` (category) protocols of ``benchmarks/protocols.py``, from a feature store made over
``protocols.all_images`` (e.g. the default model's, ``lookalike extract LIST STORE.h5``).

    python benchmarks/kr_row_max.py /work/bench-feats/2fa5ac6a2dde4afa.h5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocols import features_for, protocols  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="feature store over protocols.all_images()")
    args = ap.parse_args()
    from lookalike.numeric import knn
    from lookalike.postprocess import RerankConfig, k_reciprocal_rerank
    from lookalike.store import read_store

    st = read_store(args.store)
    print(f"{args.store}: {len(st.names)} rows, {st.features.shape[1]}-d, model {st.attrs.get('model_id', '?')}")
    lib = RerankConfig(steps=("kr",))
    settings = {"k1 20, k2 6, λ 0.3 (DIGIX)": (20, 6, 0.3), f"k1 {lib.k1}, k2 {lib.k2}, λ {lib.kr_lambda} (library)":
                (lib.k1, lib.k2, lib.kr_lambda)}
    print("| protocol | settings | plain | kr (ours) | kr, rows / row max (winner) | seconds ours / winner |")
    print("|---|---|---|---|---|---|")
    for proto in protocols():
        q, g = features_for(st.names, st.features, proto)
        plain = proto.score(knn(q, g, 10)[1])["digix_score"]
        for label, (k1, k2, lam) in settings.items():
            row = []
            for row_max in (False, True):
                t = time.perf_counter()
                _, ids = k_reciprocal_rerank(q, g, 10, k1, k2, lam, row_max=row_max)
                row.append((proto.score(ids)["digix_score"], time.perf_counter() - t))
            print(f"| {proto.name} | {label} | {plain:.4f} | {row[0][0]:.4f} | {row[1][0]:.4f} | "
                  f"{row[0][1]:.1f} / {row[1][1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
