"""Choosing settings: ``run``'s choice of ensemble weights, whitening and re-ranking on the gallery
(cached in the workdir), ``tune`` (a grid of chains on labelled validation queries) and ``tune
--self`` / ``--gallery-labels`` (the same choice for an existing collection)."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from .._io import write_json_atomic
from ..collection import Collection
from ..errors import LookalikeError
from ..formats import read_labels
from ..postprocess import as_rerank_config

log = logging.getLogger(__name__)

SELECT_MODES = ("auto", "off", "self")


def load_choice(path, models: list[str] | None = None):
    """A settings file written by ``tune --self`` / ``--gallery-labels`` (or ``run``), checked
    against the models it is used with."""
    from ..selection import Choice

    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        choice = Choice(tuple(float(w) for w in d["ensemble_weights"]), bool(d["whiten"]), as_rerank_config(d.get("rerank")),
                        float(d.get("score", 0.0)), d.get("table", []), d.get("probe", ""))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LookalikeError(f"{path}: not a settings file written by `lookalike tune --self` or "
                             f"`--gallery-labels` ({type(e).__name__}); write one with tune") from None
    if models is not None and (d.get("models", models) != models or len(choice.weights) != len(models)):
        raise LookalikeError(f"{path}: chosen for {'+'.join(d.get('models') or ['?'])}, this run uses "
                             f"{'+'.join(models)}; choose again for these models (tune --self / --gallery-labels)")
    return choice


def gallery_choice(extractor, g, gallery, select: str, gallery_labels, workdir: Path, fixed: dict, digest: str):
    """(Choice or None, where it came from) for ``run``: the gallery's classes (class folders or
    ``gallery_labels``) or pseudo-queries (``select='self'``); cached in the workdir under the rows'
    ``digest`` (``queries.rows_digest``) and what was fixed."""
    from ..data import list_images
    from ..selection import VERSION, gallery_classes, select_for_gallery

    if select == "off":
        return None, ""
    models = [m.model for m in extractor.config.members()]
    if select not in SELECT_MODES:
        return load_choice(select, models), f"from {select}"
    root = Path(gallery)
    classes = gallery_classes(root if root.is_dir() else None, g.names, gallery_labels)
    if classes is None and select != "self":
        return None, ""
    if len(extractor.config.members()) == 1 and fixed.get("whiten") is not None and fixed.get("rerank") is not None:
        return None, ""  # nothing left to choose
    key = hashlib.sha256(json.dumps([VERSION, g.fingerprint, digest,
                                     sorted((classes or {}).items()), select,
                                     {k: str(v) for k, v in fixed.items()}], sort_keys=True).encode()).hexdigest()[:12]
    cache = workdir / f"selection-{key}.json"
    source = ("from the gallery's classes" if classes is not None else "from pseudo-queries of the gallery")
    if cache.exists():
        return load_choice(cache, models), source + " (cached)"
    paths = {e.name: e.path for e in list_images(gallery)}
    log.info("choosing settings %s", source)
    choice = select_for_gallery(extractor, g.features, g.names, [paths[n] for n in g.names], classes,
                                weights=[fixed["weights"]] if fixed.get("weights") else None,
                                whitening=(fixed["whiten"],) if fixed.get("whiten") is not None else (False, True),
                                chains=[fixed["rerank"]] if fixed.get("rerank") is not None else None)
    write_json_atomic(cache, {"models": models, **choice.to_dict()})
    return choice, source


def reweighted(extractor, g, weights, path: Path):
    """(extractor, store path, features) of the gallery for other member weights, computed from the
    stored rows (no extraction); the store is written beside the original."""
    from ..extract import Extractor
    from ..selection import combine, split_members
    from ..store import read_store, write_store

    dims = extractor.member_dims()
    ex = Extractor(replace(extractor.config, ensemble_weights=tuple(float(w) for w in weights)), member_dims=dims)
    cfg = ex.config
    path = path.with_name(f"{path.name.rsplit('-', 1)[0]}-{cfg.fingerprint()}.h5")
    feats = combine(split_members(g.features, dims), weights)
    if cfg.dtype == "float16":  # what the store holds
        feats = feats.astype(np.float16).astype(np.float32)
    if not path.exists() or g.n_extracted or g.n_changed or read_store(path).names != g.names:
        write_store(path, g.names, feats, ex.store_attrs(), g.skipped, dtype=cfg.dtype, signatures=g.signatures)
    return ex, path, feats


def tune(index_dir, labels, queries=None, query_features=None, output=None, k: int = 10, workdir=None,
         progress: bool = False, log=None, trust_remote_code: bool = False) -> list:
    """``lookalike tune``: grid-search post-processing chains with labelled validation queries against
    an index; writes the best chain (and the whole table) as JSON for ``search --rerank FILE``."""
    from ..tune import tune as _tune
    from .queries import query_rows

    col = Collection.open(index_dir)
    names, feats, _ = query_rows(col, index_dir, queries, query_features, workdir, progress,
                                 {"trust_remote_code": True} if trust_remote_code else None)
    label_of = read_labels(labels)
    gallery = col.live_names()
    for kind, group in (("query", names), ("gallery image", gallery)):
        missing = [n for n in group if n not in label_of]
        if missing:
            raise LookalikeError(f"{labels}: no label for {kind} {missing[0]!r}" +
                                 (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + "; label every image")
    results = _tune(col.prepare(feats), col.gallery_features(), [label_of[n] for n in names],
                    [label_of[n] for n in gallery], k=k, log=log)
    if output:
        best_cfg, best_m = results[0]
        write_json_atomic(output, {"rerank": best_cfg.to_dict(), "metrics": best_m,
                                   "baseline": next(m for c, m in results if not c.steps),
                                   "index": str(index_dir), "queries": str(queries or query_features),
                                   "all": [{"rerank": c.to_dict(), "digix_score": m["digix_score"], "top1": m["top1"],
                                            "mAP@10": m["mAP@10"]} for c, m in results]})
    return results


def tune_gallery(index_dir, output=None, self_: bool = False, gallery_labels=None, progress: bool = False,
                 trust_remote_code: bool = False):
    """``lookalike tune INDEX --self`` / ``--gallery-labels``: choose ensemble weights, whitening and
    re-ranking from the indexed gallery (its classes, or pseudo-queries of its photos); writes the
    choice and its table as JSON for ``run --select FILE`` (and ``search --rerank FILE``)."""
    from ..data import list_images
    from ..extract import Extractor
    from ..selection import gallery_classes, select_for_gallery
    from ..store import read_store

    col = Collection.open(index_dir)
    store_path, root = col.feature_store, col.image_root
    if not store_path or not Path(store_path).is_file():
        raise LookalikeError(f"{index_dir}: its feature store {store_path!r} is gone; rebuild the index with `lookalike index`")
    if not root or not root.exists():
        raise LookalikeError(f"{index_dir}: choosing from the gallery needs its images; build the index with "
                             "`lookalike index --image-root GALLERY` (or with `run`)")
    if not col.has_extract_config:
        raise LookalikeError(f"{index_dir}: records no extraction settings (built from decoded codes or an old "
                             "store); choose with `lookalike run --select self` on the images instead")
    store = read_store(store_path)
    extractor = Extractor(col.extract_config(**({"trust_remote_code": True} if trust_remote_code else {})))
    classes = None if self_ else gallery_classes(root if root.is_dir() else None, store.names, gallery_labels)
    if classes is None and not self_:
        raise LookalikeError(f"{index_dir}: its gallery has no class folders; give --gallery-labels, or --self")
    paths = {e.name: e.path for e in list_images(root)}
    missing = [n for n in store.names if n not in paths]
    if missing:
        raise LookalikeError(f"{root}: {len(missing)} gallery images are missing (e.g. {missing[0]!r}); "
                             "point the index at the gallery folder it was built from")
    choice = select_for_gallery(extractor, store.features, store.names, [paths[n] for n in store.names], classes)
    source = "from the gallery's classes" if classes is not None else "from pseudo-queries of the gallery"
    if output:
        write_json_atomic(output, {"source": source, "index": str(index_dir),
                                   "models": [c.model for c in extractor.config.members()], **choice.to_dict()})
    return choice, source
