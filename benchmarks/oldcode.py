"""The code of an earlier git revision, for benchmarks that measure old and new side by side.

``with old_source(rev) as src:`` checks ``rev`` out as a detached worktree in a temporary folder and
yields its ``src`` folder (put it first on ``PYTHONPATH`` of a subprocess); the worktree is removed
afterwards, also when the benchmark fails.
"""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def old_source(rev: str):
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            yield tree / "src"
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
