"""Learning the projection of the ``learned`` codec (torch; see :mod:`lookalike.codec`).

The projection ``P`` (m × d, orthonormal rows via torch's orthogonal parametrisation) starts from
PCA and is trained with three losses on the reconstruction ``x̂ = (x - mean) Pᵀ P + mean``:
relative reconstruction error, a listwise similarity-preservation loss (KL between the softmax of
each row of the batch's cosine-similarity matrix before and after, temperature 0.05: the
neighbourhoods retrieval depends on), and, with labels, pytorch-metric-learning's CosFace on the
reconstructed features. The latent size m (a multiple of the byte budget) and whether training beats
plain PCA are chosen on held-out training identities.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def _holdout(n: int, labels, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if labels is not None:
        labels = np.asarray(labels)
        classes = np.unique(labels)
        val_classes = set(rng.choice(classes, max(1, len(classes) // 5), replace=False).tolist())
        val = np.array([lab in val_classes for lab in labels])
    else:
        val = rng.random(n) < 0.2
    return np.flatnonzero(~val), np.flatnonzero(val)


def _retrieval_score(orig: np.ndarray, recon: np.ndarray, labels) -> float:
    """Leave-one-out DIGIX score with labels; else recall of the original top-10 neighbours."""
    from .metrics import leave_one_out, neighbour_recall
    from .postprocess import l2n

    if labels is not None:
        return leave_one_out(l2n(recon), labels)["digix_score"]
    return neighbour_recall(l2n(orig), l2n(recon))


def train_projection(xc: np.ndarray, mean: np.ndarray, labels, m: int, epochs: int, seed: int) -> tuple[np.ndarray, list]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from .codec import _pca

    torch.manual_seed(seed)
    X = torch.from_numpy(np.ascontiguousarray(xc, np.float32))
    mu = torch.from_numpy(np.asarray(mean, np.float32))
    lin = nn.Linear(X.shape[1], m, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(_pca(xc, m).astype(np.float32)))
    nn.utils.parametrizations.orthogonal(lin)
    params = list(lin.parameters())
    cos = None
    y = None
    if labels is not None:
        from pytorch_metric_learning import losses

        classes, y_np = np.unique(np.asarray(labels), return_inverse=True)
        y = torch.from_numpy(y_np.astype(np.int64))
        cos = losses.CosFaceLoss(len(classes), X.shape[1], margin=0.2, scale=32)
        params += list(cos.parameters())
    opt = torch.optim.Adam([{"params": list(lin.parameters()), "lr": 1e-3},
                            {"params": params[len(list(lin.parameters())):], "lr": 1e-2}])
    bs = min(512, len(X))
    history = []
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        tot = 0.0
        for s in range(0, len(X) - bs + 1, bs):
            idx = perm[s : s + bs]
            xb = X[idx]
            W = lin.weight
            rec = (xb @ W.T) @ W
            rel = ((xb - rec) ** 2).sum(1).mean() / (xb ** 2).sum(1).mean().clamp_min(1e-12)
            a, b = F.normalize(xb + mu, dim=1), F.normalize(rec + mu, dim=1)
            s_a, s_b = a @ a.T / 0.05, b @ b.T / 0.05
            eye = torch.eye(len(xb), dtype=torch.bool)
            s_a, s_b = s_a.masked_fill(eye, -1e4), s_b.masked_fill(eye, -1e4)
            kl = F.kl_div(F.log_softmax(s_b, 1), F.log_softmax(s_a, 1), log_target=True, reduction="batchmean")
            loss = rel + kl
            if cos is not None:
                loss = loss + 0.1 * cos(b, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach())
        history.append({"epoch": ep + 1, "loss": tot / max(1, len(X) // bs)})
    with torch.no_grad():
        W = lin.weight.detach().double().numpy()
    return W, history


def choose_and_train_projection(x: np.ndarray, mean: np.ndarray, labels, nbytes: int, latent_dim: int | None,
                                epochs: int, seed: int) -> tuple[np.ndarray, int, list]:
    """Pick the latent size (2, 4, 8 or 16 dims per byte, at most d) and PCA vs. trained on held-out
    identities, then train the winner on everything. Returns (projection, m, history)."""
    from .codec import Codec, _orthonormal_rows, _pca

    d = x.shape[1]
    xc = x - mean
    cands = [latent_dim] if latent_dim else [m for m in (2 * nbytes, 4 * nbytes, 8 * nbytes, 16 * nbytes) if m <= d] or [nbytes]
    cands = [m for m in cands if m % nbytes == 0 and m <= d] or [nbytes]
    tr, va = _holdout(len(xc), labels, seed)
    choices = [(m, e) for m in cands for e in (0, epochs)]
    if len(choices) > 1 and len(tr) >= 256 and len(va) >= 20:
        lab = None if labels is None else np.asarray(labels)
        scores = {}
        for m, e in choices:
            proj = _pca(xc[tr], m) if e == 0 else train_projection(xc[tr], mean, None if lab is None else lab[tr], m, e, seed)[0]
            c = Codec(nbytes=nbytes, method="pq", seed=seed).fit_quantiser(x[tr], _orthonormal_rows(proj), mean)
            rec = c.decode(c.encode(x[va]))
            scores[(m, e)] = _retrieval_score(x[va], rec, None if lab is None else lab[va])
            log.info("learned codec, %d B: latent %d, %s: held-out score %.4f", nbytes, m, "trained" if e else "PCA", scores[(m, e)])
        best = max(choices, key=lambda c: scores[c])
    else:
        scores, best = {}, choices[-1]
    m, e = best
    if e == 0:
        proj, history = _pca(xc, m), []
    else:
        proj, history = train_projection(xc, mean, labels, m, e, seed)
    history = [{"selection": {f"{mm}/{'trained' if ee else 'pca'}": v for (mm, ee), v in scores.items()}}] + history
    return _orthonormal_rows(proj), m, history
