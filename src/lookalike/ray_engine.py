"""Extraction on Ray Data: ``lookalike extract ... --engine ray [--address ADDR]``.

The image list becomes a Ray dataset; ``map_batches`` runs a pool of actors, each holding one model
(the same runner the local engine uses: onnxruntime on CPUs, PyTorch on a GPU when the actor has
one); results come back in input order (``preserve_order``) and are handed to
:meth:`Extractor.extract` chunk by chunk, which writes each finished chunk to the resumable
``.parts`` folder exactly as the local engine does. So the store is the same file — same names,
order, skipped list and (to float rounding) features — and an interrupted run resumes with either
engine. Without ``--address`` Ray starts a local cluster on this machine; with one, the workers must
have lookalike installed and see the image paths (a shared file system).

Scheduling, data movement and fault tolerance are Ray's; written here are the actor and the
regrouping of results into chunks.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import LookalikeError

log = logging.getLogger(__name__)


class _Embed:
    """A Ray Data actor: decodes its batch's files and embeds them with one model."""

    def __init__(self, make_extractor, config, threads: int, dim: int):
        from dataclasses import replace

        # the extractor's own class and settings (passed in: this module does not import extract)
        self.extractor = make_extractor(replace(config, executor="local", threads=threads, workers=threads))
        from concurrent.futures import ThreadPoolExecutor

        self.extractor.runner  # load the model once per actor
        self.dim = dim
        self.pool = ThreadPoolExecutor(max(1, threads))  # decode threads, for the actor's lifetime

    def __call__(self, batch: dict) -> dict:
        from .data import ImageEntry

        entries = [ImageEntry(str(n), Path(str(p))) for n, p in zip(batch["name"], batch["path"])]
        prepared = list(self.pool.map(self.extractor.prepare_or_reason, entries))
        good = [i for i, r in enumerate(prepared) if not isinstance(r, str)]
        feats = self.extractor.embed_prepared([prepared[i] for i in good]) if good else None
        out = np.zeros((len(entries), self.dim), np.float32)  # rows of unreadable files stay zero
        if feats is not None:
            out[good] = feats
        reasons = np.array([r if isinstance(r, str) else "" for r in prepared], dtype=object)
        return {"chunk": batch["chunk"], "name": batch["name"], "feature": out, "reason": reasons}


def _init_ray(address: str | None):
    try:
        import ray
    except ImportError:
        raise LookalikeError("the ray engine needs Ray: pip install 'lookalike[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or "a local cluster"
            raise LookalikeError(f"cannot start or reach Ray at {where} ({str(e).strip().splitlines()[0]}); "
                                 "check --address, or drop it for a local cluster") from None
    return ray


def ray_chunks(extractor, chunks):
    """Yields ``(chunk, good_names, features, skipped)`` per chunk of ``ImageEntry``, in order."""
    if not chunks:
        return
    c = extractor.config
    ray = _init_ray(c.ray_address)
    import ray.data

    from PIL import Image

    # exports/caches the ONNX model once, before the actors look for it; and gives the dimension
    dim = extractor.embed_images([Image.new("RGB", (32, 32), (127, 127, 127))]).shape[1]
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", os.cpu_count() or 1)))
    if c.ray_actors:
        actors = c.ray_actors
    else:
        actors = gpus if gpus else max(1, cpus // max(1, c.threads or 2))
    threads = c.threads or max(1, cpus // actors)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's per-run INFO lines; -vv shows them
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    items = [{"chunk": ci, "name": e.name, "path": str(e.path)} for ci, chunk in enumerate(chunks) for e in chunk]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // max(1, c.batch_size), 4 * actors)))
    ds = ds.map_batches(_Embed, fn_constructor_kwargs=dict(make_extractor=type(extractor), config=c, threads=threads, dim=dim), batch_size=c.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0,
                        num_cpus=0 if gpus else threads, batch_format="numpy")
    log.info("ray: %d actor(s) x %d thread(s)%s", actors, threads, f", {gpus} GPU(s)" if gpus else "")
    current, names, feats, bad = 0, [], [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for ci, name, feat, reason in zip(batch["chunk"], batch["name"], batch["feature"], batch["reason"]):
            ci = int(ci)
            while ci != current:
                yield chunks[current], names, (np.stack(feats) if feats else None), bad
                current, names, feats, bad = current + 1, [], [], []
            if reason:
                bad.append((str(name), str(reason)))
            else:
                names.append(str(name))
                feats.append(np.asarray(feat, np.float32))
    while current < len(chunks):
        yield chunks[current], names, (np.stack(feats) if feats else None), bad
        current, names, feats, bad = current + 1, [], [], []
