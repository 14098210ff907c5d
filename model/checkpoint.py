"""Resumable training checkpoints of the accelerate trainer (model/trainer.py).

A checkpoint is a directory `<output_dir>/checkpoints/step-00001234/` holding

    model/               the model in the project's Hugging Face format (model.chat_model.save_model)
    optimizer.pt         optimiser state (torch.save of state_dict())
    scheduler.pt         learning-rate scheduler state
    rng_state_<rank>.pt  every random generator of every process (python, numpy, torch, cuda)
    trainer_state.json   step, epoch, batches consumed in the epoch, best BLEU... (written last)

It is written into `.step-00001234.tmp` and renamed when complete, so a kill during a save
leaves the previous checkpoints untouched; a directory without trainer_state.json is
never picked up. accelerate's save_state would store the weights a second time in its own
layout (not a loadable model directory), so the non-model state is saved here by hand;
under DeepSpeed (optimizer state partitioned across ranks) accelerate's save_state is used.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from utils.cli import UserError

from .chat_model import _fsync_tree, save_model

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def save_checkpoint(accelerator, root: str | Path, step: int, model, tokenizer, optimizer, scheduler,
                    state: dict, keep_latest_n: int) -> Path:
    """Write checkpoint `step` atomically from every rank; prune to `keep_latest_n`. Collective."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if _is_deepspeed(accelerator):
        accelerator.save_state(str(tmp / "accelerate"))
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tmp / "model", tokenizer)
        if not _is_deepspeed(accelerator):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved twice (e.g. epoch end == save_steps)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-max(1, keep_latest_n)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        raise UserError(f"not a complete training checkpoint (no {STATE_FILE}): {ckpt}")
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))


def load_optimizer_and_scheduler(accelerator, ckpt: str | Path, optimizer, scheduler) -> None:
    ckpt = Path(ckpt)
    if _is_deepspeed(accelerator):
        accelerator.load_state(str(ckpt / "accelerate"))
    else:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))


def load_rng(accelerator, ckpt: str | Path) -> None:
    path = Path(ckpt) / f"rng_state_{accelerator.process_index}.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt} has no random state for rank {accelerator.process_index}")
    # numpy/python states are plain tuples; the file is our own, written by save_checkpoint
    set_rng_state(torch.load(path, weights_only=False))
