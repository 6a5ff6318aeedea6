"""VBVR-Bench layout loader on small folders built here: records, lazy video decoding, clear layout errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cos_core.capture.vbvr import VBVRBench, load_vbvr


def _image(seed: int, size=(24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)  # (H, W, 3)


def _sample(folder: Path, seed: int, video: bytes | None = b"not decoded here", final: bool = False) -> np.ndarray:
    folder.mkdir(parents=True)
    pixels = _image(seed)
    Image.fromarray(pixels).save(folder / "first_frame.png")
    (folder / "prompt.txt").write_text(f"  solve puzzle {seed}\n", encoding="utf-8")
    if video is not None:
        (folder / "ground_truth.mp4").write_bytes(video)
    if final:
        Image.fromarray(_image(seed + 100)).save(folder / "final_frame.png")
    return pixels


def test_flat_and_domain_layouts_give_records(tmp_path):
    seeds = {"maze_task/maze_0001": 1, "maze_task/maze_0000": 0, "loose_sample": 2}
    expected = {sid: _sample(tmp_path / sid, seed, final=seed == 1) for sid, seed in seeds.items()}
    (tmp_path / ".cache").mkdir()  # hidden folders and stray files are not samples
    (tmp_path / "README.md").write_text("notes")
    bench = load_vbvr(tmp_path)
    assert len(bench) == 3 and bench.ids == ["loose_sample", "maze_task/maze_0000", "maze_task/maze_0001"]
    records = list(bench)
    for record in records:
        assert record.first_frame.dtype == np.uint8 and record.first_frame.shape == (24, 32, 3)
        assert np.array_equal(record.first_frame, expected[record.sample_id])
        assert record.image.size == (32, 24) and record.image.mode == "RGB"
        assert record.prompt == f"solve puzzle {seeds[record.sample_id]}"
        assert record.video_path == record.folder / "ground_truth.mp4" and record.video_path.is_file()
    assert [r.domain for r in records] == ["", "maze_task", "maze_task"]
    assert records[2].final_frame_path is not None and records[1].final_frame_path is None
    assert bench["maze_task/maze_0000"].sample_id == "maze_task/maze_0000"
    with pytest.raises(KeyError, match="no sample 'nope'"):
        bench["nope"]


def test_missing_folder_empty_folder_and_file_given(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        VBVRBench(tmp_path / "absent")
    with pytest.raises(ValueError, match="no sample folders"):
        VBVRBench(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        VBVRBench(tmp_path / "file.txt")


def test_incomplete_samples_are_named(tmp_path):
    _sample(tmp_path / "good", 0)
    _sample(tmp_path / "no_video", 1, video=None)
    (tmp_path / "no_prompt").mkdir()
    Image.fromarray(_image(3)).save(tmp_path / "no_prompt" / "first_frame.png")
    with pytest.raises(ValueError, match=r"2 sample folder\(s\).*no_prompt lacks prompt.txt, ground_truth.mp4; "
                                         r"no_video lacks ground_truth.mp4"):
        VBVRBench(tmp_path)


def test_sample_folder_given_as_root_and_bad_contents(tmp_path):
    _sample(tmp_path / "s", 0)
    with pytest.raises(ValueError, match="is itself a sample folder"):
        VBVRBench(tmp_path / "s")
    (tmp_path / "s" / "prompt.txt").write_text("   \n")
    with pytest.raises(ValueError, match="prompt.txt' is empty"):
        next(iter(VBVRBench(tmp_path)))
    (tmp_path / "s" / "prompt.txt").write_text("ok")
    (tmp_path / "s" / "first_frame.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        VBVRBench(tmp_path)[0]


def test_frames_without_pyav_names_the_install(tmp_path, monkeypatch):
    _sample(tmp_path / "s", 0)
    record = VBVRBench(tmp_path)[0]  # opening and listing never need PyAV
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match="pip install av"):
        record.frames()


def test_frames_decode_ground_truth_mp4(tmp_path):
    av = pytest.importorskip("av")
    folder = tmp_path / "s"
    _sample(folder, 0, video=None)
    rng = np.random.default_rng(0)
    frames = np.repeat(np.repeat(rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8), 8, axis=1), 8, axis=2)
    with av.open(str(folder / "ground_truth.mp4"), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"qscale": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    decoded = VBVRBench(tmp_path)[0].frames()
    assert decoded.shape == (5, 32, 32, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 12  # lossy codec, flat 8x8 blocks survive closely
    (folder / "ground_truth.mp4").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable video"):
        VBVRBench(tmp_path)[0].frames()
