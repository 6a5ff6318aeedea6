"""`capture_run` and `cos capture`: a capture that dies mid-run resumes to the same archive an uninterrupted run writes
(in-process crash and a real SIGKILL), finished shards are never rewritten, a changed configuration is refused, and
every bad input ends with exit code 2, a one-line `cos capture: error:` and nothing written or overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cos_core.archive import Archive, ArchiveError
from cos_core.archive.schema import PARTIAL_SUFFIX, PROVENANCE_KEYS, shard_name
from cos_core.capture import CaptureSpec
from cos_core.capture.run import WorkItem, capture_run
from cos_core.cli import main
from cos_core.cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
SPEC = CaptureSpec(layers="0", reductions=("frame_mean", "token_norm"), tokens=((1, 3),))
SEEDS = (0, 1, 2)


def items() -> list[WorkItem]:
    return [WorkItem(sample_id=f"seed{s}", seed=s, instance="0") for s in SEEDS]


def call_kwargs(case) -> dict:
    return {k: v for k, v in case.call_kwargs.items() if k != "output_type"}


def score(item: WorkItem, final: np.ndarray) -> dict:
    return {"score_mean": float(final.mean())}


def capture(case, runs: Path, run_id: str, spec: CaptureSpec = SPEC, score=score, work=None) -> Path:
    return capture_run(case.pipe, work or items(), spec, runs_dir=runs, run_id=run_id, call_kwargs=call_kwargs(case),
                       source="tiny:wan_t2v", score=score, command=["test"])


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """{relative path: (sha256, inode, mtime_ns)} of every file under root."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino,
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_archive(a: Archive, b: Archive) -> None:
    """Every tensor of every sample and the samples table are identical; so is the manifest up to provenance."""
    assert a.n_samples == b.n_samples
    for sample in range(a.n_samples):
        assert a.keys(sample) == b.keys(sample)
        for key in a.keys(sample):
            np.testing.assert_array_equal(a.read(sample, key), b.read(sample, key), err_msg=f"{sample} {key}")
    pd.testing.assert_frame_equal(a.samples, b.samples)
    skip = PROVENANCE_KEYS
    assert {k: v for k, v in a.manifest.items() if k not in skip} == \
        {k: v for k, v in b.manifest.items() if k not in skip}


@pytest.fixture(scope="module")
def case(tiny):
    return tiny("wan_t2v")


@pytest.fixture(scope="module")
def uninterrupted(case, tmp_path_factory) -> Archive:
    return Archive.open(capture(case, tmp_path_factory.mktemp("runs"), "full"))


# ---- resume --------------------------------------------------------------------------------------------------------


def test_a_crashed_capture_resumes_to_the_uninterrupted_archive(case, uninterrupted, tmp_path):
    def crashing(item, final):
        if item.seed == SEEDS[1]:
            raise RuntimeError("scorer crashed on the second item")
        return score(item, final)

    with pytest.raises(RuntimeError, match="second item"):
        capture(case, tmp_path, "r", score=crashing)
    partial = tmp_path / f"r{PARTIAL_SUFFIX}"
    assert not (tmp_path / "r").exists() and partial.is_dir()
    assert sorted(p.name for p in (partial / "shards").iterdir()) == ["sample_000000.safetensors"]
    first = snapshot(partial / "shards")

    path = capture(case, tmp_path, "r")
    assert path == tmp_path / "r" and not partial.exists()
    assert {k: v for k, v in snapshot(path / "shards").items() if k in first} == first, \
        "a finished shard was rewritten on resume"
    assert_same_archive(Archive.open(path), uninterrupted)


def test_resume_refuses_another_configuration_and_leaves_the_partial_run_alone(case, tmp_path):
    def first_fails(item, final):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        capture(case, tmp_path, "r", score=first_fails, work=items()[:2])
    partial = tmp_path / f"r{PARTIAL_SUFFIX}"
    before = snapshot(partial)
    with pytest.raises(ArchiveError, match="different configuration \\(differs in: config.spec.layers\\)"):
        capture(case, tmp_path, "r", spec=CaptureSpec(layers="1", reductions=SPEC.reductions, tokens=SPEC.tokens),
                work=items()[:2])
    with pytest.raises(ArchiveError, match="differs in: config.items"):
        capture(case, tmp_path, "r", work=items())
    assert snapshot(partial) == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.partial"]


def _cli_args(runs: Path, run_id: str) -> list[str]:
    """Ten samples of eight steps (~50 ms each): a wide window to kill the process between shards."""
    return ["capture", "--model", "tiny:wan_t2v", "--seeds", ",".join(map(str, range(10))), "--runs-dir", str(runs),
            "--run-id", run_id, "--num-inference-steps", "8", "--layers", "0", "--steps", "1:3", "--tokens", "1:6"]


@pytest.mark.slow
def test_a_sigkilled_cos_capture_resumes_to_the_uninterrupted_archive(tmp_path, capsys, one_torch_thread):
    runs = tmp_path / "runs"
    first_shard = runs / f"killed{PARTIAL_SUFFIX}" / shard_name(0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # as in this process: same arithmetic
    proc = subprocess.Popen([sys.executable, "-m", "cos_core.cli", *_cli_args(runs, "killed")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not first_shard.exists():
            assert proc.poll() is None, f"cos capture ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard appeared within 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (runs / "killed").exists(), "the run was published although it was killed"
    written = sorted(p.name for p in first_shard.parent.glob("sample_*.safetensors"))
    assert 1 <= len(written) < 10, written

    assert main(_cli_args(runs, "killed")) == 0
    assert main(_cli_args(runs, "whole")) == 0
    capsys.readouterr()
    killed, whole = Archive.open(runs / "killed"), Archive.open(runs / "whole")
    assert_same_archive(killed, whole)
    assert not [p for p in (runs / "killed").rglob("*") if ".tmp-" in p.name]


# ---- the command line ---------------------------------------------------------------------------------------------


def test_every_capture_flag_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["capture"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 20
    assert not [a.option_strings for a in flags if not (a.help or "").strip()]
    with pytest.raises(SystemExit) as exit_:
        main(["capture", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert all(a.option_strings[-1] in shown for a in flags)


def test_cos_capture_writes_an_archive_and_records_the_exact_command(tmp_path, capsys):
    argv = ["capture", "--model", "tiny:wan22", "--seeds", "3", "--runs-dir", str(tmp_path), "--run-id", "t1",
            "--layers", "1", "--steps", "0,5", "--reductions", "frame_mean,pool2", "--tokens", "0:4",
            "--tensors", "x0_hat", "--tensor-steps", "2:6"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == {"run": str(tmp_path / "t1")}
    assert "Traceback" not in out.err
    a = Archive.open(tmp_path / "t1")
    site = a.site("block_out")
    assert (site["layers"], site["steps"], site["tokens"]) == ([1], [0, 5], [[0, 4]])
    assert set(site["reductions"]) == {"frame_mean", "pool2"} and site["branches"] == ["cond", "uncond"]
    assert list(a.manifest["tensors"]) == ["x0_hat"] and a.manifest["tensors"]["x0_hat"]["steps"] == [2, 3, 4, 5]
    assert a.manifest["command"] == ["cos", *argv]
    assert a.samples["seed"].tolist() == [3] and a.steps["expert"].tolist()[0] == "transformer"
    assert a.manifest["model"]["boundary_ratio"] == 0.875


def test_random_wan_source_builds_the_same_seeded_model_on_every_call(tmp_path, capsys, monkeypatch):
    """`--model random:wan2.1-1.3b` (the multi-GPU benchmark's workload) with the architecture shrunk so it runs here:
    a Wan pipeline without text encoder or VAE whose weights and prompt embeddings come from fixed seeds, so two
    processes (two ranks) build the same model and write the same archive; seed ranges 'a:b' select the items."""
    from cos_core.capture import tiny_pipelines

    small = dict(tiny_pipelines.WAN_1_3B_CONFIG, num_attention_heads=2, attention_head_dim=8, ffn_dim=32,
                 num_layers=2, text_dim=32, freq_dim=16, rope_max_seq_len=32)
    monkeypatch.setattr(tiny_pipelines, "WAN_1_3B_CONFIG", small)
    base = ["capture", "--model", "random:wan2.1-1.3b", "--seeds", "0:2", "--height", "16", "--width", "16",
            "--num-frames", "5", "--num-inference-steps", "2", "--reductions", "frame_mean", "--tensors", "x0_hat",
            "--runs-dir", str(tmp_path)]
    assert main([*base, "--run-id", "a"]) == 0 and main([*base, "--run-id", "b"]) == 0
    a, b = Archive.open(tmp_path / "a"), Archive.open(tmp_path / "b")
    assert_same_archive(a, b)
    model = a.manifest["model"]
    assert a.samples["sample_id"].tolist() == ["seed0", "seed1"] and model["pipeline_class"] == "WanPipeline"
    assert model["transformer_config"]["num_layers"] == 2 and model["source"] == "random:wan2.1-1.3b"
    assert a.manifest["timing"]["world_size"] == 1 and a.manifest["timing"]["captured_here"] == 2
    assert not np.array_equal(a.read(0, "final"), a.read(1, "final"))
    capsys.readouterr()
    assert main([*base, "--model", "random:wan9"]) == 2
    assert "random:wan9 is unknown" in capsys.readouterr().err
    assert main([*base, "--seeds", "0:x"]) == 2


def _dit_folder(root: Path) -> Path:
    """A real, loadable diffusers folder of a pipeline cos-lab does not support (an image DiT)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
                                        attention_head_dim=4, num_attention_heads=2, num_embeds_ada_norm=10)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=2, latent_channels=4)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(root / "dit")
    return root / "dit"


BAD = [
    (["--model", "tiny:wan3"], "unknown tiny pipeline family 'wan3'"),
    (["--layers", "2"], "layer 2 out of range: the model has layers 0..1"),
    (["--layers", "0:9"], "layer selection '0:9': bound 9 out of range 0..2"),
    (["--steps", "4"], "step 4 out of range: the model has steps 0..3"),
    (["--tensor-steps", "0,7"], "tensor step 7 out of range"),
    (["--tokens", "0:9"], "token step 9 out of range"),
    (["--tokens", "5:0"], "token layer 5 out of range"),
    (["--tokens", "0-1"], "--tokens entry '0-1' must be 'layer:step'"),
    (["--reductions", "frame_mean,mean"], "unknown reduction 'mean'"),
    (["--branches", "both"], "branch 'both' is not allowed"),
    (["--seeds", "1,x"], "--seeds '1,x' must be a comma list of integers"),
    (["--decode", "--tensors", "x_t"], "decoding needs x0_hat"),
    (["--decode", "--tensor-steps", "0:2", "--decode-steps", "3"], "decode steps \\[3\\] are not among"),
    (["--run-id", "../escape"], "run id '../escape' is not allowed"),
    (["--num-inference-steps", "0"], "num_inference_steps as a positive int"),
    (["--true-cfg-scale", "4"], "--true-cfg-scale: WanPipeline takes no 'true_cfg_scale' argument"),
    (["--image", "missing.png"], "--image: WanPipeline takes no 'image' argument"),
    (["--batch-size", "0"], "--batch-size '0' must be a positive integer or 'auto'"),
    (["--model", "organism", "--negative-prompt", "blurry"], "--negative-prompt: the organism takes its first"),
]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(["capture", *args])
    err = capsys.readouterr().err
    return code, err


def assert_refused(code: int, err: str, message: str) -> None:
    import re

    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cos capture: error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]), err


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    runs = tmp_path / "runs"
    base = ["--model", "tiny:wan_t2v", "--runs-dir", str(runs), "--run-id", "bad"]
    code, err = run_cli(base + args, capsys)
    assert_refused(code, err, message)
    assert not runs.exists() or not list(runs.iterdir()), "a refused capture left files behind"


def test_an_unsupported_pipeline_class_is_named(tmp_path, capsys):
    folder = _dit_folder(tmp_path)
    code, err = run_cli(["--model", str(folder), "--prompt", "a cat", "--runs-dir", str(tmp_path / "runs"),
                         "--device", "cpu"], capsys)
    assert_refused(code, err, "pipeline class 'DiTPipeline' is not supported; supported: WanPipeline")
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_output_directory_is_reported(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, err = run_cli(["--model", "tiny:wan_t2v", "--runs-dir", str(blocker / "runs"), "--run-id", "x"], capsys)
    assert_refused(code, err, "cannot create the run directory .*a_file/runs/x.partial")
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_output_directory_is_reported(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o500)
    try:
        code, err = run_cli(["--model", "tiny:wan_t2v", "--runs-dir", str(runs), "--run-id", "x"], capsys)
    finally:
        runs.chmod(0o700)
    assert_refused(code, err, "cannot create the run directory")


def test_an_existing_complete_archive_is_never_overwritten(uninterrupted, capsys):
    runs, run_id = uninterrupted.path.parent, uninterrupted.path.name
    before = snapshot(runs)
    code, err = run_cli(["--model", "tiny:wan_t2v", "--seeds", "0,1,2", "--runs-dir", str(runs), "--run-id", run_id],
                        capsys)
    assert_refused(code, err, f"a complete run already exists at .*{run_id}; choose another --run-id")
    assert snapshot(runs) == before


def test_argparse_errors_use_the_same_form(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["capture", "--dtype", "float8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "cos capture: error: argument --dtype: invalid choice" in err
    assert "Traceback" not in err


def test_generation_flags_reach_the_pipeline_and_items_run_in_batches(tmp_path, capsys):
    """--image without a VBVR folder, --max-sequence-length and --batch-size together; Wan 2.2's --guidance-scale-2."""
    from PIL import Image

    image = tmp_path / "first.png"
    Image.fromarray(np.full((64, 96, 3), 200, dtype=np.uint8)).save(image)
    argv = ["capture", "--model", "tiny:wan22_ti2v", "--image", str(image), "--max-sequence-length", "8",
            "--seeds", "0:3", "--batch-size", "2", "--layers", "0", "--runs-dir", str(tmp_path), "--run-id", "ti2v"]
    assert main(argv) == 0
    assert main(["capture", "--model", "tiny:wan22", "--guidance-scale-2", "3", "--layers", "0",
                 "--runs-dir", str(tmp_path), "--run-id", "wan22"]) == 0
    capsys.readouterr()
    assert Archive.open(tmp_path / "wan22").manifest["config"]["call"]["guidance_scale_2"] == 3.0
    a = Archive.open(tmp_path / "ti2v")
    call = a.manifest["config"]["call"]
    assert call["image"]["image"] == [96, 64] and call["max_sequence_length"] == 8
    assert a.manifest["timing"]["batch_size"] == 2 and a.manifest["conditioning_frames"] == [0]
    assert a.n_samples == 3 and len({a.read(i, "final")[:, 1:].tobytes() for i in range(3)}) == 3
    frame0 = {a.read(i, "final")[:, 0].tobytes() for i in range(3)}
    assert len(frame0) == 1, "every item starts from the same input image latent"


def test_noise_per_instance_gives_every_instance_its_own_noise_and_replays(tmp_path, capsys, one_torch_thread):
    """--noise shared (default): seed 0 starts every instance from the same noise (as diffusers); per-instance: each
    (instance, seed) from its own, recorded as the sample's seed, so a replay (which reads that seed) reproduces it."""
    import numpy as np

    from cos_core.capture.sources import instance_noise_seed
    from cos_core.experiments.replay import load_replay

    base = ["capture", "--task", "fork", "--instances", "2", "--seeds", "0", "--num-inference-steps", "2",
            "--layers", "0", "--reductions", "frame_mean", "--tensors", "x_t", "--runs-dir", str(tmp_path)]
    assert main([*base, "--run-id", "shared"]) == 0
    assert main([*base, "--run-id", "own", "--noise", "per-instance"]) == 0
    capsys.readouterr()
    shared, own = Archive.open(tmp_path / "shared"), Archive.open(tmp_path / "own")
    start = {name: [a.tensor("x_t", sample=k, step=0) for k in range(2)] for name, a in (("s", shared), ("o", own))}
    np.testing.assert_array_equal(start["s"][0], start["s"][1])  # one noise for both instances
    assert not np.allclose(start["o"][0], start["o"][1])  # each instance its own
    assert shared.samples["seed"].tolist() == [0, 0]
    assert own.samples["seed"].tolist() == [instance_noise_seed(int(i), 0) for i in own.samples["instance"]]
    assert own.manifest["config"]["noise"] == "per_instance" and shared.manifest["config"]["noise"] == "shared"
    assert own.samples["sample_id"].str.endswith("-s0").all()  # the user's seed index stays in the id
    replay = load_replay(own, device="cpu")
    noise = replay.noise([it.seed for it in replay.items]).numpy()
    np.testing.assert_allclose(noise[1], start["o"][1].astype(np.float32), atol=1e-6)
