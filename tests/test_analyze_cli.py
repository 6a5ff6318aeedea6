"""`cos analyze` end to end on small archives written by the real `RunWriter`: a memory-task run with planted
signals (identity linearly readable at layer 1 late steps only; a wrong identity at steps 2-3 of even samples that
is corrected at step 4) fills every derived table, the tables read back with their config, and bad input (no
labels, NaN activations or x0_hat, an analysis that does not apply) exits 2 with a message naming the problem."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

from cos_core.archive import Archive
from cos_core.archive.writer import RunWriter
from cos_core.cli import main
from cos_core.tasks import TEST_SEEDS, get_task

N_STEPS, LAYERS, DIM = 6, (0, 1), 16


def _swap_identity(video: np.ndarray, identity: int) -> np.ndarray:
    """The same video with the object drawn in the next identity's colour (a wrong answer, right place)."""
    palette = get_task("memory").palette
    out = video.copy()
    mine = np.all(np.isclose(video, palette[2 + identity][:, None, None, None]), axis=0)  # (F, H, W)
    out[:, mine] = palette[2 + (identity + 1) % 4][:, None]
    return out


def planted_memory_run(runs_dir, run_id="planted", n_instances=16, seeds=(0, 1), labels=True, nan_cell=None,
                       nan_x0=None):
    """A memory-task archive: x0_hat per step (noise, noise, then wrong identity at steps 2-3 for even samples,
    then the truth), frame_mean activations (step, layer, frame, DIM) with identity planted at layer 1."""
    task = get_task("memory")
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(4, DIM))
    writer = RunWriter(runs_dir, run_id, {"planted": True})
    steps = [{"step": s, "t": 1000.0 * (1 - s / N_STEPS), "sigma": 1 - s / N_STEPS,
              "expert": "transformer" if s < 3 else "transformer_2"} for s in range(N_STEPS)]
    strength = np.outer([0.0, 1.0], np.linspace(0.0, 3.0, N_STEPS))  # (layer, step)
    n_samples = n_instances * len(seeds)
    for sample, (k, seed) in enumerate(product(range(n_instances), seeds)):
        inst = task.instance(TEST_SEEDS[k])
        video = inst.video
        wrong = _swap_identity(video, inst.labels["identity"]) if sample % 2 == 0 else video
        noise = rng.normal(scale=0.6, size=(2, *video.shape))
        x0 = np.concatenate([noise, wrong[None], wrong[None], video[None], video[None]]).astype(np.float32)
        acts = rng.normal(size=(N_STEPS, len(LAYERS), 8, DIM))
        acts += strength.T[:, :, None, None] * directions[inst.labels["identity"]]
        acts = acts.astype(np.float32)
        if nan_cell is not None:
            acts[nan_cell[1], nan_cell[0], 0, 0] = np.nan
        if nan_x0 is not None and sample == nan_x0[0]:
            x0[nan_x0[1], 0, 0, 0, 0] = np.nan
        tensors = {"x0_hat": x0, "final": video.astype(np.float32), "acts/block_out/frame_mean/cond": acts}
        row = {"sample_id": f"memory-{inst.seed}-s{seed}", "seed": seed, "task": "memory" if labels else "",
               "instance": str(inst.seed), "prompt": inst.prompt}
        if labels:
            row.update({f"label_{name}": value for name, value in inst.labels.items()})
        layout = {"steps": steps, "n_steps": N_STEPS, "latent": {"channels": 3, "frames": 8, "height": 24, "width": 24},
                  "token_grid": {"frames": 8, "rows": 12, "cols": 12, "patch": [1, 2, 2]},
                  "tensors": {"x0_hat": {"steps": list(range(N_STEPS)), "dtype": "float32", "shape": [3, 8, 24, 24]}},
                  "sites": {"block_out": {"n_layers": 2, "layers": list(LAYERS), "steps": list(range(N_STEPS)),
                                          "branches": ["cond"], "dim": DIM, "dtype": "float32",
                                          "reductions": {"frame_mean": {"shape": [8, DIM]}}, "tokens": []}},
                  "decoded": None}
        writer.write_sample(sample, tensors, row, layout)
    return writer.finalize(n_samples, {"config": {"task": "memory", "task_params": {}}, "command": ["planted"],
                                       "created": "2026-01-01T00:00:00+00:00", "versions": {}, "model": {}})


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    path = planted_memory_run(runs)
    return path


def test_cos_analyze_writes_every_table_and_they_read_back(analysed, capsys):
    assert main(["analyze", str(analysed), "--engine", "torch", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    archive = Archive.open(analysed)
    expected = {"probe_grid", "convergence", "phases", "step_answers", "events", "event_rates", "memory",
                "memory_frames"}
    assert set(summary["written"]) == expected and summary["skipped"] == {}
    assert set(archive.derived_names()) == expected
    for name in expected:
        table = archive.derived(name)
        assert len(table) == summary["written"][name]
        config = json.loads(table.attrs["cos_config"])
        assert config["table"] == name and config["config"]["probe"]["engine"] == "torch"

    grid = archive.derived("probe_grid").query("label == 'identity'").set_index(["layer", "step"])
    late = grid.loc[(1, N_STEPS - 1)]
    assert late["accuracy"] > 0.8 and late["selectivity"] > 0.4 and late["ci_low"] <= late["accuracy"] <= late["ci_high"]
    assert (grid.loc[0, "accuracy"] < 0.6).all()  # layer 0 carries no identity
    assert {"t", "sigma", "expert", "branch", "n", "n_instances", "chance", "control_accuracy"} <= set(grid.columns)

    events = archive.derived("events")
    planted = events[(events["sample"] % 2 == 0) & (events["step"] == 4)]
    assert sorted(planted["sample"]) == list(range(0, 32, 2)) and set(planted["kind"]) == {"self_correction"}
    assert not ((events["sample"] % 2 == 1) & (events["step"] >= 3)).any()  # odd samples are constant from step 2

    memory = archive.derived("memory")
    kept = memory.query("source == 'x0_hat' and phase == 'after' and measure == 'identity_ok' and frame == -1")
    assert kept.set_index("step").loc[5, "value"] == 1.0 and kept.set_index("step").loc[2, "value"] == 0.5
    probes = memory.query("source == 'probe' and phase == 'hidden' and measure == 'probe_identity'")
    assert probes.set_index(["layer", "step"]).loc[(1, N_STEPS - 1), "value"] > 0.8


def test_analyze_rejects_runs_without_what_an_analysis_needs(tmp_path, capsys):
    path = planted_memory_run(tmp_path, "nolabels", n_instances=3, labels=False)
    assert main(["analyze", str(path), "--which", "probes"]) == 2
    assert "no label_* columns" in capsys.readouterr().err
    assert main(["analyze", str(path), "--which", "dynamics"]) == 2
    assert "no task samples" in capsys.readouterr().err
    assert main(["analyze", str(path), "--which", "bogus"]) == 2
    assert "unknown analyses ['bogus']" in capsys.readouterr().err
    assert main(["analyze", str(path)]) == 0  # convergence still applies
    assert set(json.loads(capsys.readouterr().out.splitlines()[-1])["written"]) == {"convergence", "phases"}


def test_analyze_names_nan_cells(tmp_path, capsys):
    path = planted_memory_run(tmp_path, "nan", n_instances=4, nan_cell=(1, 3))
    assert main(["analyze", str(path), "--which", "probes", "--engine", "sklearn"]) == 2
    err = capsys.readouterr().err
    assert "NaN/inf in 1 of 12 (layer, step) cells" in err and "(layer 1, step 3" in err


def test_analyze_names_nan_in_x0_hat(tmp_path, capsys):
    path = planted_memory_run(tmp_path, "nanx0", n_instances=2, nan_x0=(3, 1))
    for which in ("convergence", "dynamics"):
        assert main(["analyze", str(path), "--which", which]) == 2
        assert "sample 3: x0_hat holds NaN/inf at step 1" in capsys.readouterr().err


def test_analyze_bad_site_and_reduction(analysed, capsys):
    assert main(["analyze", str(analysed), "--which", "probes", "--reduction", "pool4"]) == 2
    assert "reduction 'pool4' of site 'block_out' was not captured" in capsys.readouterr().err
    assert main(["analyze", str(analysed), "--which", "probes", "--site", "attn"]) == 2
    assert "site 'attn' not captured" in capsys.readouterr().err
