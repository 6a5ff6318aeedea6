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
    from cos_core.capture.tiny_pipelines import build_tiny

    cache = {}

    def get(name: str, cfg: bool = True, scheduler: str | None = None):
        key = (name, cfg, scheduler)
        if key not in cache:
            cache[key] = build_tiny(name, cfg=cfg, scheduler=scheduler)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory, one_torch_thread):
    """`organism_run(task="fork", instances=3, seeds=(0, 1), steps=4)` -> (Archive, model_dir): a tiny random organism
    (seeded weights, every task) saved to disk and captured by `capture_run` with x̂0 at every step, cached per
    module. Replays, interventions and ensembles re-run it from `model_dir`."""
    import torch

    from cos_core.archive import Archive
    from cos_core.capture import CaptureSpec
    from cos_core.capture.run import capture_run
    from cos_core.capture.sources import SourceConfig, organism_source
    from cos_core.organism.pipeline import build_pipeline
    from cos_core.tasks import TASK_NAMES

    root = tmp_path_factory.mktemp("organism")
    model_dir = root / "model"
    torch.manual_seed(0)
    build_pipeline("tiny", task_names=TASK_NAMES).save_pretrained(model_dir)
    cache = {}

    def get(task: str = "fork", instances: int = 3, seeds: tuple[int, ...] = (0, 1), steps: int = 4):
        key = (task, instances, tuple(seeds), steps)
        if key not in cache:
            config = SourceConfig(task=task, instances=instances, num_inference_steps=steps)
            src = organism_source(config, device="cpu", dtype=torch.float32, seeds=list(seeds), model_dir=model_dir)
            spec = CaptureSpec(reductions=("frame_mean",), tensors=("x0_hat",))
            run_id = f"organism-{task}-{instances}x{len(seeds)}x{steps}"
            path = capture_run(src.pipe, src.items, spec, runs_dir=root / "runs", run_id=run_id,
                               call_kwargs=src.call_kwargs, source=src.label, score=src.score,
                               command=["cos", "capture", "--task", task], extra=src.extra)
            cache[key] = Archive.open(path)
        return cache[key], model_dir

    return get
