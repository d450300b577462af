"""The one exception type users see: a one-line message that names the file and the fix."""


class LookalikeError(ValueError):
    """Bad input or a mismatch between stages; the CLI prints it as ``error: <message>``."""


def comma_choices(value, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """``"a,b"`` or a sequence -> a tuple of names, each one of ``choices``; else a one-line error."""
    items = tuple(v for v in value.replace(" ", "").split(",") if v) if isinstance(value, str) else tuple(value)
    bad = [v for v in items if v not in choices]
    if bad:
        raise LookalikeError(f"unknown {what} {bad[0]!r}; use a comma list of {', '.join(choices)}")
    return items


def check_k(k: int, n_gallery: int) -> int:
    """``k`` results per query from a gallery of ``n_gallery``: 1..n_gallery, else a one-line error."""
    if k < 1:
        raise LookalikeError(f"k must be at least 1, got {k}")
    if k > n_gallery:
        raise LookalikeError(f"k={k} is larger than the gallery ({n_gallery} images); use -k {n_gallery} or less")
    return k
