"""Exact inner-product top-k over the vectors a faiss ``IndexFlatIP`` holds, computed by onnxruntime.

A two-node ONNX graph (``Gemm`` with ``transB`` for the scores, ``TopK`` for the best ``k``) runs
over the index's own storage: the vectors are viewed in place at every call (no copy, so an index
that has grown or shrunk since the last call is always read whole and as it is now). Queries go
through in blocks so the score block stays under ~128 MB (freed after each call).

Why not faiss's own ``search`` for this one index type (``benchmarks/flat_scan.py``, 100,000 x
1,263 vectors, 2 cores, AVX-512): below 20 queries faiss runs its own scan instead of BLAS, and the
faiss-cpu wheel's bundled OpenBLAS 0.3.15 reports this AMD CPU as "Prescott" (SSE3). onnxruntime's
MLAS kernels took 35 ms for 8 queries against faiss's 109 ms, and 109 ms for 64 against 789 ms;
from ~256 queries on faiss is as fast or faster (the NaN guard below costs two passes over the
scores), so ``Collection.search`` scans calls of fewer than ``FASTER_BELOW`` queries here and larger
ones with faiss. Every other index type (IVF, HNSW, PQ, scalar quantisers) searches with faiss.

Results are faiss's up to float rounding: the same rows, scores within ~1e-6 relative (another
summation order; it also changes with the number of queries in a call, as faiss's does between its
paths under and over 20 queries), equal scores ordered by row number. A NaN score (a NaN in a
query or a row) is never a result: it becomes -inf and its row -1, as faiss answers. Written here
because no library offers a top-k product over a faiss index's memory; the kernels are
onnxruntime's.
"""
from __future__ import annotations

import numpy as np

BLOCK_BYTES = 128 << 20  # score block (queries × rows × 4 bytes) per onnxruntime call
COLUMN_KERNEL = (4, 16)  # query counts scored as (rows, queries): see FlatScan._session
FASTER_BELOW = 128  # queries per call: Collection.search scans fewer with this, more with faiss


def supports(index) -> bool:
    """True for a plain flat inner-product index (the ones :class:`FlatScan` answers)."""
    import faiss

    flat = faiss.downcast_index(index)
    return type(flat) in (faiss.IndexFlatIP, faiss.IndexFlat) and flat.metric_type == faiss.METRIC_INNER_PRODUCT


def vectors(index) -> np.ndarray:
    """The ``(ntotal, d)`` float32 vectors of a flat index, viewed in place (valid until it changes)."""
    import faiss

    flat = faiss.downcast_index(index)
    n, d = int(flat.ntotal), int(flat.d)
    if n == 0:
        return np.zeros((0, d), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)


class FlatScan:
    """``search(index, queries, k)`` -> ``(scores, rows)`` like ``index.search``: best first, rows
    ``-1`` and scores ``-inf`` where the index has fewer than ``k`` vectors.

    ``threads``: onnxruntime's intra-op threads (0: as many as faiss uses, ``faiss.omp_get_max_threads()``).
    """

    def __init__(self, threads: int = 0):
        self.threads = threads
        self._sessions: dict[int, object] = {}

    def _session(self, d: int, by_row: bool):
        """``by_row``: scores as (queries, rows) and the top k along each query's row; else (rows,
        queries), top k down each column, transposed: the kernel for a tall product with a few
        columns, 15-35 % faster from 8 to 16 queries, equal at 4, slower from 20 (measured on
        100,000 x 1,263, 2 cores)."""
        if (d, by_row) not in self._sessions:
            import onnxruntime as ort
            from onnx import TensorProto, helper

            # a NaN score (a NaN in a query or a row) becomes -inf, below every real score: TopK would
            # rank NaN first; faiss never returns such a row, and neither does search() (row -1)
            no_nan = [helper.make_node("IsNaN", ["raw"], ["nan"]),
                      helper.make_node("Where", ["nan", "ninf", "raw"], ["s"])]
            if by_row:
                nodes = [helper.make_node("Gemm", ["q", "x"], ["raw"], transB=1), *no_nan,
                         helper.make_node("TopK", ["s", "k"], ["v", "i"], axis=1, largest=1, sorted=1)]
            else:
                nodes = [helper.make_node("Gemm", ["x", "q"], ["raw"], transB=1), *no_nan,
                         helper.make_node("TopK", ["s", "k"], ["vt", "it"], axis=0, largest=1, sorted=1),
                         helper.make_node("Transpose", ["vt"], ["v"], perm=[1, 0]),
                         helper.make_node("Transpose", ["it"], ["i"], perm=[1, 0])]
            graph = helper.make_graph(
                nodes, "flat_ip_topk",
                [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", d]),
                 helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d]),
                 helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "k"]),
                 helper.make_tensor_value_info("i", TensorProto.INT64, ["b", "k"])],
                [helper.make_tensor("ninf", TensorProto.FLOAT, [], [float("-inf")])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads or _faiss_threads()
            opts.inter_op_num_threads = 1
            opts.enable_cpu_mem_arena = False  # the score block is freed after each call, not kept
            # idle threads sleep at once: a server runs the network next to this, they must not spin
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.log_severity_level = 3
            self._sessions[d, by_row] = ort.InferenceSession(model.SerializeToString(), opts,
                                                             providers=["CPUExecutionProvider"])
        return self._sessions[d, by_row]

    def search(self, index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != index.d:
            raise ValueError(f"queries must be (n, {index.d}), got {q.shape}")
        x = vectors(index)
        n, kk = len(x), min(k, len(x))
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        if kk == 0 or len(q) == 0:
            return scores, rows
        step = max(1, BLOCK_BYTES // (4 * n))
        kfeed = np.array([kk], np.int64)
        for s in range(0, len(q), step):
            block = q[s : s + step]
            sess = self._session(q.shape[1], by_row=not COLUMN_KERNEL[0] <= len(block) <= COLUMN_KERNEL[1])
            v, i = sess.run(None, {"q": block, "x": x, "k": kfeed})
            scores[s : s + step, :kk], rows[s : s + step, :kk] = v, i
        rows[np.isneginf(scores)] = -1  # NaN scores (made -inf above): no row, as faiss answers
        return scores, rows


def _faiss_threads() -> int:
    import faiss

    return max(1, faiss.omp_get_max_threads())
