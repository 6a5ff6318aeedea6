"""The one way cos_core changes a live pipeline: patch an attribute for the length of a `with` block, hook a module's
forward, follow the CFG branch a transformer call runs under, and notice blocks a cache skipped. Capture,
interventions and the ensemble all use it.

Owns `patched` (wrap an attribute, restore it exactly in `finally`), `hooked` (a forward or forward-pre hook removed
in `finally`), `BranchTracker` and `SkipTracker`. No other module of cos_core assigns `scheduler.step` or
`cache_context` (tests/test_architecture.py checks). Imports the standard library and, inside `hooked`, torch (to
keep hooks out of `torch.compile`'s graphs); torch modules arrive as arguments.
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
    """`hook` registered on a torch module's forward (or, with `pre`, before it) for the block, removed in `finally`.
    The hook always runs eagerly: inside a `torch.compile`d model it is a graph break, not traced."""
    import torch

    hook = torch.compiler.disable(hook)
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


# diffusers cache hooks whose block, in a call where the blocks after it are skipped, returns its own output plus the
# cached residual of the skipped ones (FirstBlockCache, MagCache, SeaCache name them "...leader...")
CACHE_LEADER_MARK = "leader"


class SkipTracker:
    """Whether a block's own forward ran, for blocks under a diffusers cache (FirstBlockCache, MagCache, ...).

    A cache that skips a block returns a stored tensor from the block's replaced forward without calling any of its
    submodules; a pre-hook on each direct child notices whether one ran. `skipped(block)` after the block's call says
    it did not. `leads(block)`: the block carries a cache's leader hook, whose output is altered whenever the cache
    skips the blocks after it (that call's other blocks then count as skipped too)."""

    def __init__(self) -> None:
        self._ran: dict[int, bool] = {}

    @staticmethod
    def cached(module: Any) -> bool:
        """Whether any module under `module` carries diffusers hooks (a cache, group offloading, layerwise casting,
        context parallelism); `cache_context` alone leaves an empty registry on the transformer."""
        return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for m in module.modules())

    @staticmethod
    def leads(block: Any) -> bool:
        registry = getattr(block, "_diffusers_hook", None)
        return any(CACHE_LEADER_MARK in name for name in getattr(registry, "hooks", {}))

    def track(self, block: Any) -> contextlib.AbstractContextManager:
        """A `with` block inside which calls of `block` are followed."""
        key = id(block)

        def start(module, args):
            self._ran[key] = False

        def ran(module, args):
            self._ran[key] = True

        with contextlib.ExitStack() as stack:  # a failure half-way removes what was installed so far
            stack.enter_context(hooked(block, start, pre=True))
            for child in block.children():
                stack.enter_context(hooked(child, ran, pre=True))
            return stack.pop_all()

    def skipped(self, block: Any) -> bool:
        return not self._ran.get(id(block), True)
