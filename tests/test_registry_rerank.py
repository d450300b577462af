"""The re-ranking step registry: unchanged configs, grid and dispatch for the built-in steps, and a
step added by registration alone reaches RerankConfig, rerank(), the CLI parameters and tune."""
import hashlib
import itertools
import json

import numpy as np
import pytest

from lookalike.errors import LookalikeError
from lookalike.numeric import knn
from lookalike.postprocess import (RerankConfig, RerankParam, alpha_qe, as_rerank_config, dba, diffusion_rerank,
                                   k_reciprocal_rerank, l2n, register_rerank_step, rerank, rerank_chain_help,
                                   rerank_parameters, rerank_steps, unregister_rerank_step)
from lookalike import postprocess
from lookalike.tune import default_grid, tune

# RerankConfig.to_dict() as the dataclass wrote it before the registry: key order and types
OLD_DEFAULTS = dict(dba_k=2, dba_alpha=3.0, qe_k=2, qe_alpha=3.0, k1=20, k2=6, kr_lambda=0.3, df_k=30, df_query_k=10,
                    df_gamma=3.0, df_alpha=0.99, df_iters=20)


def old_default_grid(n_gallery):
    """tune.default_grid as written out by hand before the registry, as to_dict() dicts."""
    def cfg(steps=(), **kw):
        return {"steps": list(steps), **{**OLD_DEFAULTS, **kw}}

    grid = [cfg()]
    dbas = [dict(dba_k=k, dba_alpha=a) for k in (2, 3, 5) for a in (0.0, 3.0)]
    qes = [dict(qe_k=k, qe_alpha=a) for k in (1, 2, 3, 5) for a in (0.0, 3.0)]
    grid += [cfg(("dba",), **d) for d in dbas] + [cfg(("qe",), **q) for q in qes]
    grid += [cfg(("dba", "qe"), **d, **q) for d, q in itertools.product(dbas, qes)]
    grid += [cfg(("kr",), k1=k1, k2=k2, kr_lambda=lam) for k1 in (10, 20) for k2 in (3, 6) for lam in (0.1, 0.3, 0.6)
             if k1 < n_gallery]
    grid += [cfg(("df",), df_k=gk, df_query_k=qk, df_alpha=a)
             for gk, qk, a in itertools.product((10, 20, 50), (5, 10), (0.9, 0.99)) if gk < n_gallery]
    return grid


# sha256 of json.dumps([c.to_dict() for c in default_grid(n)]) from the code before the registry
OLD_GRID_SHA = {1000: "c490fc0d4b1f71e0e316c606e650bb4d1acb76b04b796402ba6f8645ad370a43",
                50: "b2bbdde474c632038eb3b0f8902de04eefc28959065600c1840926328426e84a",
                20: "e5ffb8a119b7633b6563b67a662761236ea0c730fb1236719a633a96c1e7f8dc",
                10: "bfe19c6f193316f9d919c3de016e7ee2c0ed2cfdc6bae83860439601acf67562"}


def clustered(n_q=40, n_g=300, d=16, n_classes=25, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n_classes, d))
    lq, lg = rng.integers(0, n_classes, n_q), rng.integers(0, n_classes, n_g)
    return (l2n(c[lq] + 0.9 * rng.normal(size=(n_q, d))), l2n(c[lg] + 0.9 * rng.normal(size=(n_g, d))), lq, lg)


@pytest.mark.parametrize("n", [1000, 51, 50, 21, 20, 11, 10, 3])
def test_default_grid_unchanged(n):
    # parameters added since (with their defaults) are not part of the frozen copy
    added = {"kr_row_max": 0, "df_truncate": -1}
    dicts = [c.to_dict() for c in default_grid(n)]
    assert all(d[k] == v for d in dicts for k, v in added.items())
    new = json.dumps([{k: v for k, v in d.items() if k not in added} for d in dicts])  # order and int/float types count
    assert new == json.dumps(old_default_grid(n))
    if n in OLD_GRID_SHA:
        assert hashlib.sha256(new.encode()).hexdigest() == OLD_GRID_SHA[n]


def test_config_json_shape_and_dataclass_behaviour():
    cfg = RerankConfig(("dba", "qe"), dba_k=3, qe_alpha=0.0)
    d = cfg.to_dict()
    old = list(OLD_DEFAULTS)  # a parameter added later goes after its step's others
    assert list(d) == ["steps", *old[:7], "kr_row_max", *old[7:], "df_truncate"]
    assert d == {"steps": ["dba", "qe"], **OLD_DEFAULTS, "kr_row_max": 0, "df_truncate": -1, "dba_k": 3, "qe_alpha": 0.0}
    assert [p.name for p in rerank_parameters()] == [*old[:7], "kr_row_max", *old[7:], "df_truncate"]
    assert RerankConfig.from_dict(d) == cfg and RerankConfig.from_dict(d) is not cfg
    assert cfg != RerankConfig(("dba", "qe"), dba_k=3) and cfg != d
    assert cfg.dba_k == 3 and cfg.k1 == 20 and cfg.params["qe_alpha"] == 0.0
    assert repr(RerankConfig("kr")) == ("RerankConfig(steps=('kr',), dba_k=2, dba_alpha=3.0, qe_k=2, qe_alpha=3.0, "
                                       "k1=20, k2=6, kr_lambda=0.3, kr_row_max=0, df_k=30, df_query_k=10, df_gamma=3.0, "
                                       "df_alpha=0.99, df_iters=20, df_truncate=-1)")
    cfg.k1 = 7  # settable like a dataclass field, and written out
    assert cfg.to_dict()["k1"] == 7
    r = cfg.replace(steps=("aqe", "kr"), k2=3)
    assert (r.steps, r.k1, r.k2, r.dba_k, cfg.steps, cfg.k2) == (("aqe", "kr"), 7, 3, 3, ("dba", "qe"), 6)
    with pytest.raises(TypeError, match="unknown parameter 'dba_kk'"):
        RerankConfig("dba", dba_kk=3)
    with pytest.raises(AttributeError):
        cfg.nonsense
    with pytest.raises(LookalikeError, match="unknown re-ranking step 'xx'; use a comma list of dba, qe, aqe, kr, df"):
        RerankConfig("dba,xx")
    with pytest.raises(LookalikeError, match=r"^kr \(k-reciprocal\) and df \(diffusion\) produce the final ranking"):
        RerankConfig("kr,df")
    assert rerank_chain_help() == "dba, qe (alpha-QE), aqe, then kr (k-reciprocal) or df (diffusion) last"


def test_as_rerank_config(tmp_path):
    assert as_rerank_config(None) is None and as_rerank_config("") is None and as_rerank_config(RerankConfig()) is None
    assert as_rerank_config({"steps": []}) is None
    assert as_rerank_config("dba, qe") == RerankConfig(("dba", "qe"))
    cfg = RerankConfig(("qe", "kr"), qe_k=3)
    assert as_rerank_config(cfg) is cfg
    # a dict from a newer version (unknown key) and one from before diffusion existed (no df_* keys)
    assert as_rerank_config({**cfg.to_dict(), "future_knob": 1}) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("df_")}
    assert as_rerank_config(old) == cfg
    (tmp_path / "best.json").write_text(json.dumps({"rerank": cfg.to_dict(), "metrics": {}}), encoding="utf-8")
    (tmp_path / "plain.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    (tmp_path / "none.json").write_text(json.dumps({"rerank": None}), encoding="utf-8")
    assert as_rerank_config(str(tmp_path / "best.json")) == cfg
    assert as_rerank_config(tmp_path / "plain.json") == cfg
    assert as_rerank_config(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{nope", encoding="utf-8")
    for bad in ("bad.json", "missing.json"):
        with pytest.raises(LookalikeError, match="cannot read a re-ranking config"):
            as_rerank_config(tmp_path / bad)


def test_builtin_dispatch_is_the_direct_calls():
    q0, g0, _, _ = clustered()
    q, g = l2n(q0), l2n(g0)  # rerank() normalises its inputs first
    s, i = rerank(q0, g0, 10, RerankConfig(("dba", "qe", "kr"), dba_k=3, qe_k=3, k1=12))
    g2 = dba(g, 3, 3.0)
    s2, i2 = k_reciprocal_rerank(alpha_qe(q, g2, 3, 3.0), g2, 10, 12, 6, 0.3)
    assert np.array_equal(i, i2) and np.array_equal(s, s2)
    s, i = rerank(q0, g0, 10, RerankConfig(("aqe", "df"), qe_k=4, df_k=15, df_gamma=2.0, df_iters=5))
    s2, i2 = diffusion_rerank(alpha_qe(q, g, 4, 0.0), g, 10, 15, 10, 2.0, 0.99, 5)
    assert np.array_equal(i, i2) and np.array_equal(s, s2)
    s, i = rerank(q0, g0, 5, RerankConfig())
    assert np.array_equal(i, knn(q, g, 5)[1]) and np.array_equal(s, knn(q, g, 5)[0])


@pytest.fixture
def toy_steps():
    """A gallery-side step that moves every query onto one gallery vector, and a final step that
    ranks worst first; removed again after the test."""
    calls = []

    def pull(q, g, k, cfg):
        calls.append(("pull", cfg.pull_to, cfg.pull_w))
        return l2n(q + cfg.pull_w * g[cfg.pull_to]), g

    def worst(q, g, k, cfg):
        calls.append(("worst", cfg.worst_skip))
        order = np.argsort(q @ g.T, axis=1, kind="stable")[:, cfg.worst_skip : cfg.worst_skip + k]
        return np.take_along_axis(q @ g.T, order, 1), order

    register_rerank_step("pull", pull, label="pull to one", params=(
        RerankParam("pull_to", int, 0, "Pull: the gallery vector pulled to.", tune=(0, 1)),
        RerankParam("pull_w", float, 0.0, "Pull: its weight.", tune=(5.0,)),
    ))
    register_rerank_step("worst", worst, final=True, params=(
        {"name": "worst_skip", "type": int, "default": 0, "help": "Worst: skip this many.", "tune": (0, 2)},))
    try:
        yield calls
    finally:
        unregister_rerank_step("worst")
        unregister_rerank_step("pull")


def test_registered_step_reaches_config_rerank_cli_and_tune(toy_steps):
    q, g, lq, lg = clustered()
    # config: accepted, its parameters (after the built-in ones) in the JSON and as attributes
    cfg = RerankConfig("dba,pull,worst", pull_to=7, pull_w=50.0)
    assert list(cfg.to_dict())[-3:] == ["pull_to", "pull_w", "worst_skip"]
    assert RerankConfig.from_dict(cfg.to_dict()) == cfg and cfg.worst_skip == 0
    assert "pull" in postprocess.RERANK_STEPS and postprocess.FINAL_STEPS == ("kr", "df", "worst")
    with pytest.raises(LookalikeError, match="put it last"):
        RerankConfig("worst,pull")
    with pytest.raises(LookalikeError, match=r"kr \(k-reciprocal\), df \(diffusion\) and worst produce"):
        RerankConfig("kr,worst")
    # dispatch: pull makes every query almost gallery vector 7, worst ranks it last of all
    _, ids = rerank(q, g, 10, RerankConfig("pull", pull_to=7, pull_w=50.0))
    assert (ids[:, 0] == 7).all()
    _, ids = rerank(q, g, len(g), RerankConfig("pull,worst", pull_to=7, pull_w=50.0))
    assert (ids[:, -1] == 7).all() and toy_steps[-2:] == [("pull", 7, 50.0), ("worst", 0)]
    # CLI parameters
    params = {p.name: p for p in rerank_parameters()}
    assert (params["pull_w"].option, params["pull_w"].type, params["pull_w"].default, params["pull_w"].step) == \
        ("--pull-w", float, 0.0, "pull")
    assert params["worst_skip"].help == "Worst: skip this many." and params["worst_skip"].step == "worst"
    assert [s.name for s in rerank_steps()][-2:] == ["pull", "worst"]
    assert rerank_chain_help().endswith("aqe, pull (pull to one), then kr (k-reciprocal) or df (diffusion) or worst last")
    # tune's grid: alone, chained after dba and qe, and as a final step
    grid = [(c.steps, c.pull_to, c.pull_w, c.worst_skip) for c in default_grid(1000)]
    assert grid.count((("pull",), 0, 5.0, 0)) == 1 and grid.count((("pull",), 1, 5.0, 0)) == 1
    assert sum(st == ("dba", "pull") for st, *_ in grid) == 6 * 2
    assert sum(st == ("dba", "qe", "pull") for st, *_ in grid) == 6 * 8 * 2
    assert [x for x in grid if x[0] == ("worst",)] == [(("worst",), 0, 0.0, 0), (("worst",), 0, 0.0, 2)]
    assert len(default_grid(1000)) == 87 + 2 + 6 * 2 + 8 * 2 + 6 * 8 * 2 + 2
    # tune's "best expansion + each final step" extension includes the new final step
    res = tune(q, g, lq, lg, grid=[RerankConfig(), RerankConfig("dba", dba_k=3), RerankConfig("worst", worst_skip=2)])
    ext = [c for c, _ in res if c.steps == ("dba", "worst")]
    assert len(ext) == 1 and (ext[0].dba_k, ext[0].worst_skip) == (3, 2)


def test_registration_errors(toy_steps):
    with pytest.raises(LookalikeError, match="already registered"):
        register_rerank_step("pull", lambda *a: a)
    with pytest.raises(LookalikeError, match="already exists"):
        register_rerank_step("pull2", lambda *a: a, params=(RerankParam("dba_k", int, 1),))
    with pytest.raises(LookalikeError, match="is not float"):
        register_rerank_step("pull2", lambda *a: a, params=(RerankParam("pull2_w", float, 1),))
    with pytest.raises(LookalikeError, match="RerankConfig attribute"):
        register_rerank_step("pull2", lambda *a: a, params=(RerankParam("steps", int, 1),))
    assert "pull2" not in postprocess.RERANK_STEPS


def test_unregistered_step_is_gone():
    register_rerank_step("tmp_step", lambda q, g, k, c: (q, g))
    unregister_rerank_step("tmp_step")
    with pytest.raises(LookalikeError, match="unknown re-ranking step 'tmp_step'"):
        RerankConfig("tmp_step")
    assert [s.name for s in rerank_steps()] == ["dba", "qe", "aqe", "kr", "df"]
