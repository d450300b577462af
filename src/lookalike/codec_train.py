"""Choosing and learning the projection of the ``learned`` codec (see :mod:`lookalike.codec`).

Candidates, each an orthonormal m × d map followed by PQ at the byte budget:
- ``pca``: the top-m principal directions;
- ``lda`` (with labels): the discriminant subspace — directions that separate identities relative to
  their within-identity spread (regularised Fisher LDA, at most #identities − 1 of them), and
  ``lda+pca``: the same completed with the top principal directions of what they leave out. Reconstructions keep the identity
  signal and drop the nuisance (pose, light, background), which is why this codec can score *above*
  the float32 features it compresses;
- ``opq``: faiss's full-dimensional OPQ rotation (so the learned codec is never worse than OPQ on the
  held-out identities); when the held-out split leaves fewer training vectors than dimensions (faiss's
  OPQ crashes there), the ``opq`` method's small-set latent (:func:`lookalike.codec.opq_latent_dim`);
- ``trained``: the best of the above at its m, fine-tuned with torch (orthogonal parametrisation)
  on relative reconstruction error + a listwise similarity-preservation loss (KL between the
  softmax of each row of the batch's cosine-similarity matrix before and after, temperature 0.05)
  + pytorch-metric-learning's CosFace on the reconstructed features when labels are given.
The latent size m (2, 4, 8 or 16 dims per byte) and the candidate are chosen on held-out training
data — by default a fifth of the identities, never seen by the candidates being compared (open set,
as in NAIC re-ID); with ``selection="images"`` a fifth of every identity's images (closed set: the
gallery holds the training classes, as in the grocery protocol) — and the winner is refitted on
everything. Fisher LDA is a few lines of numpy (scikit-learn's would add a
dependency for the same eigenproblem).

This module depends on :mod:`lookalike.codec` (the PQ quantiser scores candidates, OPQ is one of
them), never the reverse: the ``learned`` entry of the codec registry names
:func:`fit_learned_projection` by module path, so it is imported only when a learned codec is fitted.
"""
from __future__ import annotations

import logging

import numpy as np

from .codec import Codec, opq_latent_dim, opq_projection, padded_dim
from .errors import LookalikeError
from .numeric import orthonormal_rows, pca_basis

log = logging.getLogger(__name__)


def fit_learned_projection(codec: Codec, x: np.ndarray, labels) -> np.ndarray:
    """The ``learned`` method's projection fitter (see :class:`lookalike.codec.CodecMethod`):
    :func:`choose_and_train_projection` with the codec's settings; records the chosen latent size
    in ``codec.latent_dim`` and the selection (and training) in ``codec.history_``."""
    if labels is not None and len(labels) != len(x):
        raise LookalikeError(f"codec: {len(labels)} labels for {len(x)} feature rows")
    proj, codec.latent_dim, codec.history_ = choose_and_train_projection(
        x, codec.mean_, labels, codec.nbytes, codec.latent_dim, codec.epochs, codec.seed, codec.selection)
    return proj


def _holdout(n: int, labels, seed: int, by: str = "identities") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if labels is not None and by == "images":  # a fifth of each identity's images
        labels = np.asarray(labels)
        val = np.zeros(n, bool)
        for lab in np.unique(labels):
            idx = np.flatnonzero(labels == lab)
            if len(idx) >= 4:
                val[rng.choice(idx, max(2, len(idx) // 5), replace=False)] = True
    elif labels is not None:
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
    from .numeric import l2n

    if labels is not None:
        return leave_one_out(l2n(recon), labels)["digix_score"]
    return neighbour_recall(l2n(orig), l2n(recon))


def discriminant_basis(xc: np.ndarray, labels, m: int, reg: float = 0.1, fill: str = "pca") -> np.ndarray:
    """(m, d) orthonormal rows: regularised Fisher-LDA directions of centred ``xc`` (at most
    #classes − 1), then (``fill="pca"``) the top principal directions of the remainder or
    (``fill="zero"``) zero rows: latent dimensions that carry nothing, so the reconstruction keeps
    only the discriminant subspace."""
    xc = np.asarray(xc, np.float64)
    n, d = xc.shape
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(y).astype(np.float64)
    means = np.zeros((len(classes), d))
    np.add.at(means, y, xc)
    means /= counts[:, None]
    within = xc - means[y]
    sw = within.T @ within / n
    sw += reg * np.trace(sw) / d * np.eye(d)
    sb = (means.T * counts) @ means / n
    evals, evecs = np.linalg.eigh(sw)
    whiten = evecs / np.sqrt(np.maximum(evals, 1e-12))
    e2, u = np.linalg.eigh(whiten.T @ sb @ whiten)
    r = min(m, len(classes) - 1, d)
    basis = orthonormal_rows((whiten @ u[:, np.argsort(e2)[::-1][:r]]).T) if r > 0 else np.zeros((0, d))
    if m > r and fill == "zero":
        basis = np.vstack([basis, np.zeros((m - r, d))])
    elif m > r:
        rest = xc - (xc @ basis.T) @ basis
        basis = np.vstack([basis, pca_basis(rest, m - r)])
    return orthonormal_rows(basis)


def train_projection(xc: np.ndarray, mean: np.ndarray, labels, m: int, epochs: int, seed: int,
                     init: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)
    X = torch.from_numpy(np.ascontiguousarray(xc, np.float32))
    mu = torch.from_numpy(np.asarray(mean, np.float32))
    lin = nn.Linear(X.shape[1], m, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy((pca_basis(xc, m) if init is None else init).astype(np.float32)))
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


def _candidate(kind: str, xc: np.ndarray, labels, m: int, nbytes: int, seed: int) -> np.ndarray:
    if kind == "pca":
        return pca_basis(xc, m)
    if kind == "lda":
        return discriminant_basis(xc, labels, m, fill="zero")
    if kind == "lda+pca":
        return discriminant_basis(xc, labels, m, fill="pca")
    return opq_projection(xc, nbytes, seed, latent=m)  # m >= d: exactly the full rotation


def choose_and_train_projection(x: np.ndarray, mean: np.ndarray, labels, nbytes: int, latent_dim: int | None,
                                epochs: int, seed: int, selection: str = "identities") -> tuple[np.ndarray, int, list]:
    """Score every candidate (kind, m) on held-out identities, fine-tune the best, keep whichever
    scores higher, and refit that recipe on all of ``x``. Returns (projection, m, history)."""
    d = x.shape[1]
    xc = x - mean
    ms = [latent_dim] if latent_dim else [m for m in (nbytes, 2 * nbytes, 4 * nbytes, 8 * nbytes, 16 * nbytes) if m <= d] or [nbytes]
    ms = [m for m in ms if m % nbytes == 0 and m <= d] or [nbytes]
    lab = None if labels is None else np.asarray(labels)
    n_disc = len(np.unique(lab)) - 1 if lab is not None else 0
    choices = [(m, "pca") for m in ms if m > nbytes or latent_dim]
    if n_disc > 0:  # pure discriminant subspace (zero-padded past its n_disc dims), and PCA-completed
        above = [m for m in ms if m > n_disc][:1]  # the smallest latent that holds all of it
        choices += [(m, "lda") for m in ms if m <= n_disc or m in above]
        choices += [(m, "lda+pca") for m in ms if m > n_disc]
    d_opq = padded_dim(d, nbytes)
    tr, va = _holdout(len(xc), labels, seed, selection)
    if not latent_dim:  # the full rotation needs as many vectors as dimensions (faiss crashes otherwise)
        choices.append((d_opq if len(tr) >= d_opq else opq_latent_dim(len(tr), d, nbytes), "opq"))
    scores: dict = {}
    best = choices[-1]
    if len(tr) >= 256 and len(va) >= 20:
        def score(proj):
            c = Codec(nbytes=nbytes, method="pq", seed=seed).fit_quantiser(x[tr], orthonormal_rows(proj), mean)
            return _retrieval_score(x[va], c.decode(c.encode(x[va])), None if lab is None else lab[va])

        protos = {}
        for m, kind in choices:
            protos[(m, kind)] = _candidate(kind, xc[tr], None if lab is None else lab[tr], m, nbytes, seed)
            scores[(m, kind)] = score(protos[(m, kind)])
            log.info("learned codec, %d B: latent %d, %s: held-out score %.4f", nbytes, m, kind, scores[(m, kind)])
        best = max(choices, key=lambda c: scores[c])
        if epochs and best[1] != "opq":
            m, kind = best
            tuned, _ = train_projection(xc[tr], mean, None if lab is None else lab[tr], m, epochs, seed,
                                        init=orthonormal_rows(protos[best]))
            scores[(m, kind + "+trained")] = score(tuned)
            log.info("learned codec, %d B: latent %d, %s fine-tuned: held-out score %.4f", nbytes, m, kind,
                     scores[(m, kind + "+trained")])
            if scores[(m, kind + "+trained")] > scores[best]:
                best = (m, kind + "+trained")
    m, kind = best
    proj = _candidate(kind.removesuffix("+trained"), xc, lab, m, nbytes, seed)  # "lda+pca" stays "lda+pca"
    history: list = []
    if kind.endswith("+trained"):
        proj, history = train_projection(xc, mean, lab, m, epochs, seed, init=orthonormal_rows(proj))
    history = [{"selection": {f"{mm}/{kk}": v for (mm, kk), v in scores.items()}, "chosen": f"{m}/{kind}"}] + history
    return orthonormal_rows(proj), m, history
