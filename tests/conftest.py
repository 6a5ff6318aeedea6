"""Shared test plumbing: GPU tests skip without CUDA; tiny pipelines are built once per module, run on one thread."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box two threads run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    """`tiny(name, cfg=True, scheduler=None)`: a `TinyCase` built once per test module (building is seeded, so every
    module sees the same weights; running a pipeline resets its scheduler, so sharing the object is safe)."""
    from cos_core.tiny_pipelines import build_tiny

    cache = {}

    def get(name: str, cfg: bool = True, scheduler: str | None = None):
        key = (name, cfg, scheduler)
        if key not in cache:
            cache[key] = build_tiny(name, cfg=cfg, scheduler=scheduler)
        return cache[key]

    return get
