"""Batched capture: several work items in one pipeline call, each with its own seed, labels and shard.

Owns which rows of a transformer call belong to which item and CFG branch (`rows`), running each item's rows through
the transformer on their own inside a batched call (`per_item_forward`: CPU kernels are not batch-invariant, so this
is what keeps a batched archive bit-identical to an unbatched one), grouping work items into pipeline calls and
merging their keyword arguments (`groups`, `call_kwargs`), the per-item generators, why a pipeline cannot batch, and
the default batch size for a device. Imports torch; diffusers only through the pipeline object; never the archive.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

# call kwargs with one row per prompt: a shared (1, ...) value is repeated to one row per item of the batch
PER_ROW = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
           "prompt_attention_mask", "negative_prompt_attention_mask")
PROMPTS = ("prompt", "negative_prompt")  # shared strings become one entry per item
AUTO_MAX = 256          # the largest batch the device default picks
AUTO_MEMORY = 0.6       # share of the free GPU memory the device default fills


def rows(batched_cfg: bool, branch: str | None, batch: int, n_items: int, members: int) -> list[tuple[str, slice]]:
    """[(branch, rows)] of one transformer call over `n_items` items of `members` rows each: the rows are each
    item's first member, in item order. Batched-CFG families (CogVideoX, LTX) run [uncond rows, cond rows] in one
    call; the others run cond and uncond as separate calls named by `branch` (the pipeline's `cache_context`)."""
    width = n_items * members
    if batched_cfg:
        if batch == 2 * width:
            return [("uncond", slice(0, width, members)), ("cond", slice(width, 2 * width, members))]
        if batch == width:
            return [("cond", slice(0, width, members))]
    elif batch == width and branch in ("cond", "uncond"):
        return [(branch, slice(0, width, members))]
    videos = "one video" if width == 1 else f"{n_items} items x {members} videos"
    raise ValueError(f"cannot label CFG branches: a transformer call with batch {batch} in context {branch!r}, "
                     f"expected {videos} per pipeline call")


def item_rows(batched_cfg: bool, batch: int, n_items: int, members: int) -> list[torch.Tensor]:
    """Row indices of each item in a transformer call (both CFG halves for batched-CFG families)."""
    width = n_items * members
    halves = 2 if batched_cfg and batch == 2 * width else 1
    if batch != halves * width:
        raise ValueError(f"a transformer call with batch {batch} for {n_items} items of {members} rows")
    return [torch.cat([torch.arange(h * width + k * members, h * width + (k + 1) * members) for h in range(halves)])
            for k in range(n_items)]


def per_item_forward(original: Callable, n_items: Callable[[], int], batched_cfg: bool, members: int,
                     on_item: Callable[[int], None]) -> Callable:
    """A transformer `forward` that runs each item's rows as its own call and puts the outputs back in row order.

    Every tensor argument whose first dimension is the call's batch is split by rows; `on_item(k)` runs before
    item k's call (so hooks know which item they see) and `on_item(-1)` after the last."""
    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        n = n_items()
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if n == 1 or not isinstance(hidden, torch.Tensor):
            return original(*args, **kwargs)
        batch = hidden.shape[0]

        def part(value: Any, index: torch.Tensor) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                return value.index_select(0, index.to(value.device))
            return value

        outputs, order = [], item_rows(batched_cfg, batch, n, members)
        try:
            for k, index in enumerate(order):
                on_item(k)
                outputs.append(original(*[part(a, index) for a in args],
                                        **{name: part(v, index) for name, v in kwargs.items()}))
        finally:
            on_item(-1)
        first = outputs[0]
        pieces = [o[0] if isinstance(o, tuple) else o.sample for o in outputs]
        whole = torch.empty((batch, *pieces[0].shape[1:]), dtype=pieces[0].dtype, device=pieces[0].device)
        whole[torch.cat(order).to(whole.device)] = torch.cat(pieces)
        return (whole, *first[1:]) if isinstance(first, tuple) else type(first)(sample=whole)
    return forward


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value that cannot compare is not the same
        return False


def _shared(value: Any) -> bool:
    """Per-item kwargs that cannot be merged along the batch (images, ...): a batch holds one value of each."""
    return not isinstance(value, (torch.Tensor, str))


def groups(order: Sequence[int], item_kwargs: Callable[[int], dict], batch_size: int) -> list[list[int]]:
    """Consecutive items of `order` in groups of at most `batch_size`; a group also ends where an item's unmergeable
    kwargs (an input image, ...) differ from the group's."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size:
            head, mine = item_kwargs(out[-1][0]), item_kwargs(i)
            if set(head) == set(mine) and all(_same(head[k], mine[k]) for k in head if _shared(head[k])):
                out[-1].append(i)
                continue
        out.append([i])
    return out


def call_kwargs(shared: dict[str, Any], per_item: list[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline call's kwargs for the items of a group: tensors concatenated along the batch, strings as one
    list entry per item, shared prompt strings and (1, ...) prompt embeddings repeated per item."""
    n = len(per_item)
    out = dict(shared)
    if n > 1:
        for key in PROMPTS:
            if isinstance(out.get(key), str):
                out[key] = [out[key]] * n
        for key in PER_ROW:
            value = out.get(key)
            if isinstance(value, torch.Tensor) and value.shape[0] == 1:
                out[key] = torch.cat([value] * n)
    for key in per_item[0]:
        values = [kw[key] for kw in per_item]
        if isinstance(values[0], torch.Tensor):
            out[key] = values[0] if n == 1 else torch.cat(values)
        elif isinstance(values[0], str):
            out[key] = values[0] if n == 1 else values
        else:
            out[key] = values[0]
    return out


def generators(seeds: Sequence[int], members: int, device: Any) -> torch.Generator | list[torch.Generator]:
    """One generator per batch row, item k's rows seeded with its seed (a list, as diffusers accepts): each row then
    draws the noise a call of its own would. A single item keeps one generator (its members draw in sequence)."""
    if len(seeds) == 1:
        return torch.Generator(device=device).manual_seed(int(seeds[0]))
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds for _ in range(members)]


def why_unbatchable(pipe: Any, members: int, item_kwargs: dict[str, Any]) -> str | None:
    """Why this pipeline cannot run several items per call (None: it can)."""
    from .hooks import SkipTracker
    from .families import experts

    if any(SkipTracker.cached(m) for _, m in experts(pipe)):
        return ("its transformer carries diffusers hooks (a cache, group offloading or context parallelism) that act "
                "per call on the whole batch, so items would not match their unbatched captures")
    if members > 1 and "latents" not in item_kwargs:
        return "each item is an ensemble of members drawn from one generator; give each item its `latents`"
    return None


def default_batch_size(device: Any) -> int | None:
    """1 on a CPU (CPU kernels gain little from a batch); None on a GPU: measure one item, then fill the memory."""
    return None if torch.device(device).type == "cuda" else 1


def fit_batch_size(device: Any, peak_bytes: int, n_left: int) -> int:
    """The batch that fills `AUTO_MEMORY` of the GPU's free memory, given one item's measured peak."""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    fit = int(AUTO_MEMORY * free // max(peak_bytes, 1))
    return max(1, min(fit, AUTO_MAX, max(n_left, 1)))
