"""The organism: pipeline contract (shapes, determinism, callbacks, CFG calls, save/load), the shipped weights,
training with exact resume, checkpoint shards, and clear errors. Tiny presets and small videos keep it fast."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from cos_core.organism import PRESETS, OrganismPipeline, build_pipeline  # noqa: E402
from cos_core.organism.checkpoint import load_sharded, save_sharded  # noqa: E402
from cos_core.organism.data import parse_tasks, task_mix  # noqa: E402
from cos_core.organism.train import TrainConfig, Trainer  # noqa: E402
from cos_core.cli.train import add_arguments, run  # noqa: E402
from cos_core.tasks import TEST_SEEDS, get_task  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "organism"
SMALL_VIDEO = (3, 2, 8, 8)
MAZE_PARAMS = {"maze": {"size": 2, "min_path": 2, "n_frames": 2, "height": 10, "width": 10}}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_pipeline("tiny", video_shape=SMALL_VIDEO)


def first_frames(b: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (b, 3, 8, 8)).astype(np.float32)


def test_shapes_and_output_types(tiny):
    out = tiny(first_frames(), task="maze", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(out.frames, np.ndarray) and out.frames.shape == (2, 3, 2, 8, 8)
    assert out.frames.min() >= -1 and out.frames.max() <= 1
    pt = tiny(first_frames(1)[0], task=2, num_inference_steps=1, output_type="pt").frames
    assert torch.is_tensor(pt) and pt.shape == (1, 3, 2, 8, 8)


def test_deterministic_with_generator(tiny):
    def sample(seed):
        return tiny(first_frames(), task=["maze", "choice"], num_inference_steps=3,
                    generator=torch.Generator().manual_seed(seed), output_type="latent").frames

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_callback_once_per_step_and_last_x0_hat_is_the_output(tiny):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, float(t), kwargs["x0_hat"].clone()))
        return {}

    out = tiny(first_frames(), task="memory", num_inference_steps=4, output_type="latent",
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "x0_hat"]).frames
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == tiny.scheduler.timesteps.tolist()
    torch.testing.assert_close(seen[-1][2], out)  # σ_next = 0 at the last step: x_0 = x̂0


def test_callback_can_replace_latents(tiny):
    out = tiny(first_frames(), task="maze", num_inference_steps=2, output_type="latent",
               callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])}).frames
    assert torch.equal(out, torch.zeros_like(out))


def test_cfg_makes_separate_cond_and_uncond_calls(tiny):
    calls = []
    handle = tiny.transformer.register_forward_hook(lambda m, a, kw, o: calls.append(kw["encoder_hidden_states"]),
                                                    with_kwargs=True)
    try:
        tiny(first_frames(1), task="choice", num_inference_steps=3, guidance_scale=3.0)
    finally:
        handle.remove()
    assert len(calls) == 6
    assert all(c[:, 0].sum() == 1 for c in calls[0::2]) and all(c[:, 0].sum() == 0 for c in calls[1::2])


def test_save_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "org", max_shard_size="20KB")
    loaded = OrganismPipeline.from_pretrained(tmp_path / "org")
    assert loaded.config.task_names == tiny.config.task_names and list(loaded.config.video_shape) == list(SMALL_VIDEO)

    def sample(pipe):
        return pipe(first_frames(), task="maze", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                    output_type="latent").frames

    assert torch.equal(sample(tiny), sample(loaded))


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="no shipped weights")
def test_shipped_weights_need_their_steps_and_solve_held_out_instances_on_cpu():
    """Regression guard for the shipped organism on held-out instances: the maze (unique answer, regime (b)) is
    solved more often with 8 steps than with 1; arrows, recall and dispatch are solved at 8 steps; two noise draws
    walk the fork to different goals (16 steps). Its card reports accuracy vs steps on >= 400 instances per trained task."""
    pipe = OrganismPipeline.from_pretrained(SHIPPED)
    card = json.loads((SHIPPED / "eval.json").read_text())
    params, trained = dict(pipe.config.task_params), list(pipe.config.trained_tasks)
    assert set(card["accuracy_vs_steps"]) == set(trained) == set(card["answer_is_unique"])
    assert all(r["1"]["n"] >= 400 and set(r) >= {"1", "2", "4", "8", "16", "32"} for r in card["accuracy_vs_steps"].values())
    maze = get_task("maze", **params["maze"])
    insts = [maze.instance(TEST_SEEDS.start + 777_000 + s) for s in range(16)]
    first = np.stack([inst.first_frame for inst in insts])
    solved = {}
    for steps in (1, 8):
        video = pipe(first, task="maze", num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames
        solved[steps] = sum(maze.score(maze.extract(v), inst)["correct"] for v, inst in zip(video, insts))
    assert solved[8] >= solved[1] + 3, f"maze solved {solved} of 16 at 1 vs 8 steps: the steps should add"
    for name in ("arrows", "recall", "dispatch"):
        task = get_task(name, **params.get(name, {}))
        inst = task.instance(TEST_SEEDS.start + 777_777)
        video = pipe(inst.first_frame, task=name, num_inference_steps=8,
                     generator=torch.Generator().manual_seed(0)).frames[0]
        assert task.score(task.extract(video), inst)["correct"] == 1.0, name
    fork, goals = get_task("fork"), set()
    inst = fork.instance(TEST_SEEDS.start + 777_778)
    for seed in range(2):
        video = pipe(inst.first_frame, task="fork", num_inference_steps=16,
                     generator=torch.Generator().manual_seed(seed)).frames[0]
        score = fork.score(fork.extract(video), inst)
        assert score["correct"] == 1.0, seed
        goals.add(score["goal"])
    assert goals == {0.0, 1.0}, "every noise draw walked to the same goal"


def test_bad_pipeline_arguments(tiny):
    with pytest.raises(ValueError, match="unknown task 'sokoban'"):
        tiny(first_frames(), task="sokoban")
    with pytest.raises(ValueError, match="out of range"):
        tiny(first_frames(), task=7)
    with pytest.raises(ValueError, match="expected"):
        tiny(np.zeros((2, 3, 9, 8), np.float32), task="maze")
    with pytest.raises(ValueError, match="output_type"):
        tiny(first_frames(), task="maze", output_type="gif")
    with pytest.raises(ValueError, match="exactly one"):
        tiny(first_frames(), num_inference_steps=1)
    with pytest.raises(ValueError, match="not allowed"):
        tiny(first_frames(), task="maze", callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="unknown preset"):
        build_pipeline("huge")


def test_task_mix_and_bad_training_arguments():
    assert parse_tasks("maze:2, memory,choice") == (("maze", 2.0), ("memory", 1.0), ("choice", 1.0))
    assert task_mix(parse_tasks("maze:2,memory,choice"), 256).counts == (128, 64, 64)
    for spec, msg in (("sokoban", "unknown task"), ("maze:x", "not a number"), ("maze:0", "> 0"), ("", "no task")):
        with pytest.raises(ValueError, match=msg):
            parse_tasks(spec)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=2)
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    assert set(PRESETS) >= {"tiny", "small"}


def test_checkpoint_shards_respect_the_size_limit(tmp_path):
    tensors = {f"w{i}": torch.randn(64, 64) for i in range(10)}  # 16 KiB each
    files = save_sharded(tensors, tmp_path, "model", max_bytes=100_000)
    assert len(files) > 1 and all((tmp_path / f).stat().st_size <= 100_000 for f in files)
    back = load_sharded(tmp_path, files)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def _config(steps: int, **kw) -> TrainConfig:
    base = dict(preset="tiny", tasks=(("maze", 1.0),), task_params=MAZE_PARAMS, steps=steps, batch_size=2,
                precision="fp32", val_n=0, eval_n=0, warmup=1, checkpoint_every=100, num_inference_steps=2)
    return TrainConfig(**{**base, **kw})


def test_resume_continues_exactly(tmp_path):
    straight = Trainer(_config(2), tmp_path / "a")
    straight.run()
    first = Trainer(_config(2, time_limit=1e-9), tmp_path / "b")  # stops (and checkpoints) after one step
    first.run()
    assert first.state["step"] == 1
    resumed = Trainer(_config(2), tmp_path / "b", resume=True)
    assert resumed.state["step"] == 1
    resumed.run()
    assert resumed.state["step"] == 2
    for module in ("model", "ema"):
        a, b = getattr(straight, module).state_dict(), getattr(resumed, module).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), module
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(_config(2, batch_size=3), tmp_path / "b", resume=True)
    with pytest.raises(ValueError, match="exists"):
        Trainer(_config(2), tmp_path / "b")


def test_cli_trains_and_writes_weights_and_card(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "organism"
    args = parser.parse_args(["--preset", "tiny", "--tasks", "maze", "--task-params", json.dumps(MAZE_PARAMS),
                              "--steps", "2", "--batch-size", "2", "--eval-n", "2", "--val-n", "0",
                              "--num-inference-steps", "2", "--device", "cpu", "--out", str(out)])
    assert run(args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["step"] == 2 and report["test"]["tasks"]["maze"]["n"] == 2
    assert len(report["test"]["tasks"]["maze"]["per_step_accuracy"]) == 2
    assert "Held-out accuracy" in (out / "README.md").read_text()
    assert OrganismPipeline.from_pretrained(out).transformer.config.num_layers == PRESETS["tiny"]["num_layers"]
    with pytest.raises(ValueError, match="no checkpoint"):
        run(parser.parse_args(["--resume", "--out", str(tmp_path / "none")]))
    with pytest.raises(ValueError, match="--task-params"):
        run(parser.parse_args(["--task-params", "{oops", "--out", str(tmp_path / "x")]))


def _saved_organism(folder: Path, task_names=("maze", "memory", "choice"), seed: int = 123, **arch) -> dict:
    """Save a tiny organism of the maze test shape with seeded weights; returns its transformer state dict."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from cos_core.organism.presets import transformer_config

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**transformer_config("tiny"), **arch})
    pipe = OrganismPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                            task_names=task_names, video_shape=(3, 2, 10, 10))
    pipe.save_pretrained(folder, max_shard_size="20KB")
    (folder / "eval.json").write_text(json.dumps({"step": 7, "train_seconds": 60.0,
                                                  "config": {"tasks": [["maze", 2.0], ["memory", 1.0]]}}))
    return {k: v.clone() for k, v in transformer.state_dict().items()}


def test_init_from_starts_from_saved_weights_and_grows_the_task_list(tmp_path):
    from cos_core.tasks import TASKS

    saved = _saved_organism(tmp_path / "prior")
    fresh = Trainer(_config(1), tmp_path / "fresh")
    trainer = Trainer(_config(1, init_from=str(tmp_path / "prior")), tmp_path / "tuned")
    for module in (trainer.model, trainer.ema):
        state = module.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert not all(torch.equal(fresh.model.state_dict()[k], saved[k]) for k in saved)  # the init really changed them
    assert list(trainer.pipe.config.task_names) == list(TASKS) and len(TASKS) > 3
    assert trainer.optimizer.state_dict()["state"] == {}  # AdamW starts fresh
    assert trainer.state["init"]["task_names"] == ["maze", "memory", "choice"] and trainer.state["init"]["step"] == 7

    # the CLI: --init-from trains, exports all task ids and records the init folder in config, eval.json and card
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "cli"
    assert run(parser.parse_args(["--preset", "tiny", "--tasks", "maze", "--task-params", json.dumps(MAZE_PARAMS),
                                  "--steps", "1", "--batch-size", "2", "--eval-n", "1", "--val-n", "0",
                                  "--num-inference-steps", "2", "--device", "cpu", "--out", str(out),
                                  "--init-from", str(tmp_path / "prior")])) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["config"]["init_from"] == str(tmp_path / "prior") and report["init"]["from"] == str(tmp_path / "prior")
    card = (out / "README.md").read_text()
    assert f"--init-from {tmp_path / 'prior'}" in card and "initial weights: the transformer of" in card
    assert OrganismPipeline.from_pretrained(out).config.task_names == list(TASKS)
    with pytest.raises(ValueError, match="init_from"):  # resume must not switch the init folder
        run(parser.parse_args(["--resume", "--out", str(out), "--init-from", str(tmp_path / "other")]))


def test_init_from_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="not a save_pretrained organism folder"):
        Trainer(_config(1, init_from=str(tmp_path / "missing")), tmp_path / "a")
    _saved_organism(tmp_path / "reordered", task_names=("memory", "maze"))
    with pytest.raises(ValueError, match="prefix"):
        Trainer(_config(1, init_from=str(tmp_path / "reordered")), tmp_path / "b")
    _saved_organism(tmp_path / "deeper", num_layers=3)
    with pytest.raises(ValueError, match="another architecture: num_layers"):
        Trainer(_config(1, init_from=str(tmp_path / "deeper")), tmp_path / "c")
    with pytest.raises(ValueError, match="init_from must be"):
        TrainConfig(init_from=None)


class _ScriptedPipe:
    """Stands in for the pipeline: the final video walks to a goal fixed by (instance, noise seed); x̂0 of step 0 is
    a 0.6 : 0.4 blend of that walk and the other goal's, x̂0 of step 1 the walk itself."""

    _execution_device = torch.device("cpu")

    def __init__(self, task, seeds):
        self.task, self.scheduler = task, type("S", (), {"sigmas": torch.tensor([1.0, 0.5, 0.0])})()
        self.insts = {task.instance(s).first_frame.tobytes(): task.instance(s) for s in seeds}

    def goal(self, inst, noise_seed):
        return (inst.seed + noise_seed) % 2

    def __call__(self, first, task, num_inference_steps, generator, callback_on_step_end=None, **_):
        noise_seed = generator.initial_seed()
        walks, blends = [], []
        for frame in first:
            inst = self.insts[np.ascontiguousarray(frame).tobytes()]
            goal = self.goal(inst, noise_seed)
            walk, other = (self.task.solution_video(inst, g) for g in (goal, 1 - goal))
            walks.append(walk)
            blends.append(0.6 * walk + 0.4 * other)
        for i, x0 in enumerate((blends, walks)):
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, None, {"x0_hat": torch.as_tensor(np.stack(x0))})
        return type("Out", (), {"frames": np.stack(walks)})()


def test_evaluate_counts_fork_goals_and_candidates_against_a_scripted_pipe():
    from cos_core.organism.evaluate import evaluate, noise_redraw

    task, seeds = get_task("fork"), list(range(10, 16))
    pipe = _ScriptedPipe(task, seeds)
    result = evaluate(pipe, {"fork": seeds}, 2)
    r = result["tasks"]["fork"]
    assert r["accuracy"] == 1.0 and r["per_step_accuracy"] == [0.0, 1.0]  # a blend is not an answer
    assert r["goal_split"] == {"0": 0.5, "1": 0.5, "none": 0.0} and r["final_goal"] == [s % 2 for s in seeds]
    assert r["per_step_candidates_alive"]["0.25"] == [2.0, 1.0] and r["per_step_candidates_alive"]["0.5"] == [1.0, 1.0]
    np.testing.assert_allclose(r["per_step_evidence_chosen"], [0.6, 1.0], atol=1e-5)
    np.testing.assert_allclose(r["per_step_evidence_runner_up"], [0.4, 0.0], atol=1e-5)
    assert result["sigmas"] == [1.0, 0.5]
    redraw = noise_redraw(pipe, result, {"fork": seeds}, seed=1)["fork"]  # seed 1 flips every goal
    assert redraw["same_goal"] == 0.0 and redraw["n_both"] == len(seeds) and redraw["accuracy"] == 1.0
    pipe.goal = lambda inst, noise_seed: inst.seed % 2  # a maze-fixed choice: the same goal under any noise
    assert noise_redraw(pipe, result, {"fork": seeds}, seed=1)["fork"]["same_goal"] == 1.0
