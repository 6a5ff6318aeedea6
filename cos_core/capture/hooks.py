"""The one way cos_core changes a live pipeline: patch an attribute for the length of a `with` block, hook a module's
forward, and follow the CFG branch a transformer call runs under. Capture, interventions and the ensemble all use it.

Owns `patched` (wrap an attribute, restore it exactly in `finally`), `hooked` (a forward or forward-pre hook removed
in `finally`) and `BranchTracker`. No other module of cos_core assigns `scheduler.step` or `cache_context`
(tests/test_architecture.py checks). Imports the standard library only; torch modules arrive as arguments.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def patched(obj: Any, attr: str, wrap: Callable[[Any], Any]) -> Iterator[Any]:
    """Inside the block, `obj.attr` is `wrap(obj.attr)`; afterwards it is exactly what it was.

    Restoring puts back an instance attribute that someone else had set (another tool's wrapper, an outer patch of
    ours), and otherwise deletes ours, so a class attribute seen through the instance (a bound method) shows again.
    Patches nest: restore them in the reverse order (an `ExitStack` or nested `with`s do)."""
    own = vars(obj)
    had, previous = attr in own, own.get(attr)
    replacement = wrap(getattr(obj, attr))
    setattr(obj, attr, replacement)
    try:
        yield replacement
    finally:
        if had:
            setattr(obj, attr, previous)
        else:
            delattr(obj, attr)


@contextlib.contextmanager
def hooked(module: Any, hook: Callable, *, pre: bool = False, with_kwargs: bool = False) -> Iterator[None]:
    """`hook` registered on a torch module's forward (or, with `pre`, before it) for the block, removed in `finally`."""
    if pre:
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    else:
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        handle.remove()


class BranchTracker:
    """The CFG branch ("cond" / "uncond") of the transformer call now running, read from the name a pipeline passes
    to the transformer's `cache_context` around each call (Wan, HunyuanVideo and the organism do; a family that
    batches both branches in one call does not, and `name` then stays `default`)."""

    def __init__(self, default: str | None = None):
        self.default = default
        self.name = default

    def track(self, transformer: Any) -> contextlib.AbstractContextManager:
        """A `with` block inside which `name` follows `transformer.cache_context`."""
        return patched(transformer, "cache_context", self._wrap)

    def _wrap(self, original: Callable) -> Callable:
        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
            previous, self.name = self.name, name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self.name = previous
        return cache_context
