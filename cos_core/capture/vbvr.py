"""VBVR-Bench layout reader: a folder of sample folders -> records of first frame, prompt and ground-truth video.

A sample folder holds `first_frame.png`, `prompt.txt`, `ground_truth.mp4` (and optionally `final_frame.png`), directly
under the root or grouped by domain one level down (`<root>/<domain>_task/<sample>/`), as VBVR's generators write
them. The layout is checked when the bench opens; images and prompts are read per record, videos decoded only when
asked (PyAV, imported lazily). Must not import torch, diffusers or the rest of capture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

FIRST_FRAME = "first_frame.png"
PROMPT = "prompt.txt"
GROUND_TRUTH = "ground_truth.mp4"
FINAL_FRAME = "final_frame.png"  # optional
REQUIRED = (FIRST_FRAME, PROMPT, GROUND_TRUTH)
MAX_LISTED = 5  # incomplete samples named in one error message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VBVRSample:
    """One benchmark sample; `frames()` decodes the ground-truth video on demand."""

    sample_id: str  # folder path relative to the root, "/"-joined, e.g. "maze_task/maze_0001"
    folder: Path
    prompt: str
    first_frame: np.ndarray  # (H, W, 3) uint8 RGB
    video_path: Path
    final_frame_path: Path | None

    @property
    def domain(self) -> str:
        """The grouping folder (e.g. "maze_task"), or "" for a flat layout."""
        return self.sample_id.rsplit("/", 1)[0] if "/" in self.sample_id else ""

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.first_frame)

    def frames(self) -> np.ndarray:
        """Ground-truth frames (frame, H, W, 3) uint8 RGB, decoded with PyAV."""
        return read_video(self.video_path)


class VBVRBench:
    """Iterable over the samples under `root`, in sorted sample-id order; also `len`, `ids` and `bench[id or i]`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise ValueError(f"VBVR-Bench folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"VBVR-Bench path {str(self.root)!r} is not a folder")
        if any((self.root / name).is_file() for name in REQUIRED):
            raise ValueError(f"{str(self.root)!r} is itself a sample folder; pass the folder that contains samples")
        self._folders = find_samples(self.root)
        if not self._folders:
            raise ValueError(
                f"no sample folders in {str(self.root)!r}: expected <root>/<sample>/ or <root>/<domain>/<sample>/ "
                f"folders holding {', '.join(REQUIRED)}"
            )
        self._check_complete()
        self.ids = [folder.relative_to(self.root).as_posix() for folder in self._folders]
        log.info("VBVR-Bench %s: %d samples", self.root, len(self.ids))

    def _check_complete(self) -> None:
        missing = {f: [n for n in REQUIRED if not (f / n).is_file()] for f in self._folders}
        missing = {f: names for f, names in missing.items() if names}
        if missing:
            items = [f"{f.relative_to(self.root).as_posix()} lacks {', '.join(n)}" for f, n in missing.items()]
            more = f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            listed = "; ".join(items[:MAX_LISTED]) + more
            raise ValueError(f"{len(missing)} sample folder(s) in {str(self.root)!r} are incomplete: {listed}")

    def __len__(self) -> int:
        return len(self._folders)

    def __iter__(self) -> Iterator[VBVRSample]:
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, key: int | str) -> VBVRSample:
        if isinstance(key, str):
            if key not in self.ids:
                raise KeyError(f"no sample {key!r} in {str(self.root)!r}; e.g. {self.ids[:3]}")
            key = self.ids.index(key)
        folder = self._folders[key]
        final = folder / FINAL_FRAME
        return VBVRSample(
            sample_id=self.ids[key],
            folder=folder,
            prompt=read_prompt(folder / PROMPT),
            first_frame=read_image(folder / FIRST_FRAME),
            video_path=folder / GROUND_TRUTH,
            final_frame_path=final if final.is_file() else None,
        )

    def __repr__(self) -> str:
        return f"VBVRBench({str(self.root)!r}, {len(self)} samples)"


def find_samples(root: Path) -> list[Path]:
    """Sample folders: children of root (or grandchildren, under a domain folder) holding a required file or
    holding no sub-folders. Hidden folders are skipped."""
    samples = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        subfolders = sorted(p for p in child.iterdir() if p.is_dir() and not p.name.startswith("."))
        if any((child / name).is_file() for name in REQUIRED) or not subfolders:
            samples.append(child)
        else:
            samples.extend(subfolders)
    return samples


def read_prompt(path: Path) -> str:
    prompt = path.read_text(encoding="utf-8").strip()
    if not prompt:
        raise ValueError(f"{str(path)!r} is empty: a sample needs a prompt")
    return prompt


def read_image(path: Path) -> np.ndarray:
    """PNG -> (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except OSError as error:
        raise ValueError(f"{str(path)!r} is not a readable image: {error}") from error


def read_video(path: Path) -> np.ndarray:
    """mp4 -> (frame, H, W, 3) uint8 RGB via PyAV."""
    try:
        import av
    except ImportError as error:
        raise ImportError("decoding ground_truth.mp4 needs PyAV: pip install av") from error
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError) as error:  # av.error.* also subclass OSError/ValueError
        raise ValueError(f"{str(path)!r} is not a readable video: {error}") from error
    if not frames:
        raise ValueError(f"{str(path)!r} holds no video frames")
    return np.stack(frames)  # (frame, H, W, 3)


def load_vbvr(root: str | Path) -> VBVRBench:
    """Open a VBVR-Bench folder (ValueError for a missing or empty folder or an incomplete sample)."""
    return VBVRBench(root)
