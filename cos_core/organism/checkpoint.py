"""Training checkpoints: safetensors shards of at most 16 MiB plus one JSON file of counters and config.

Owns the checkpoint folder layout (`state.json`, `<group>-NNNNN.safetensors` for the groups model / ema /
optim), the optimizer state <-> flat tensor dict conversion, and the atomic swap (write `<dir>.tmp`, then
rename). No pickle anywhere. Imports torch and safetensors only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
MAX_SHARD_BYTES = 16 * 2**20
GROUPS = ("model", "ema", "optim")


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, group: str,
                 max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors` as `<group>-00000.safetensors`, ... each at most `max_bytes`; returns the file names."""
    files: list[str] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"{group}-{len(files):05d}.safetensors"
            save_file(shard, str(folder / name))
            files.append(name)
        shard, size = {}, 0

    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes > max_bytes - 2**16:
            raise ValueError(f"tensor {key!r} has {nbytes} bytes, more than one {max_bytes}-byte shard holds")
        if size + nbytes > max_bytes - 2**16:  # leave room for the safetensors header
            flush()
        shard[key] = t
        size += nbytes
    flush()
    return files


def load_sharded(folder: Path, files: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(str(folder / name)))
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state -> flat tensors {"<param index>.<key>": tensor} and JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(folder: Path, groups: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """Atomically replace `folder` with shards of each tensor group and `state.json` (which lists the shards)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = dict(state, files={name: save_sharded(t, tmp, name) for name, t in groups.items()})
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(state, {group: tensors}) of a checkpoint folder; groups whose shards are absent are left out."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.exists():
        raise ValueError(f"{folder} is not a checkpoint: no {STATE_FILE} in it")
    state = json.loads(path.read_text())
    groups = {}
    for name, files in state.get("files", {}).items():
        if all((folder / f).exists() for f in files):
            groups[name] = load_sharded(folder, files)
    return state, groups
