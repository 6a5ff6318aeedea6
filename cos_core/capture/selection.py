"""One filter argument for layers and steps, normalised once: None, an int, "a:b[:c]", "1,5,9", a list, or a
predicate, resolved against the model into sorted unique indices with a ValueError naming what is out of range.

Owns only that; the capturer and the run loop use it for layers, steps, token and decode steps. Imports the
standard library only (no torch).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


def _parse(spec: str, n: int, what: str) -> list[int]:
    spec = spec.strip()
    if spec in ("", "all", ":"):
        return list(range(n))
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) > 3:
            raise ValueError(f"{what} selection {spec!r} is not a slice 'start:stop[:step]'")
        try:
            nums = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise ValueError(f"{what} selection {spec!r}: slice bounds must be integers") from None
        for v in nums[:2]:
            if v is not None and not 0 <= v <= n:
                raise ValueError(f"{what} selection {spec!r}: bound {v} out of range 0..{n}")
        return list(range(n))[slice(*nums)]
    try:
        return [int(p) for p in spec.split(",")]
    except ValueError:
        raise ValueError(f"{what} selection {spec!r}: use 'all', 'a:b[:c]' or a comma list like '0,5,9'") from None


def select(spec: Any, n: int, what: str) -> tuple[int, ...]:
    """Indices in 0..n-1 chosen by `spec`, sorted and unique; ValueError naming `what` when out of range."""
    if spec is None:
        chosen: Iterable[int] = range(n)
    elif isinstance(spec, bool):
        raise ValueError(f"{what} selection {spec!r}: a bool is not an index")
    elif isinstance(spec, int):
        chosen = [spec]
    elif isinstance(spec, str):
        chosen = _parse(spec, n, what)
    elif callable(spec):
        predicate: Callable[[int], bool] = spec
        chosen = [i for i in range(n) if predicate(i)]
    else:
        chosen = [int(i) for i in spec]
    out = sorted(set(int(i) for i in chosen))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} {bad[0]} out of range: the model has {what}s 0..{n - 1}")
    if not out:
        raise ValueError(f"{what} selection {spec!r} selects nothing (of 0..{n - 1})")
    return tuple(out)
