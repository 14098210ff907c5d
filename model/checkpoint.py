"""Resumable training checkpoints: their one naming scheme and resume lookup for every stage,
and the format of the accelerate trainer's (model/trainer.py).

Every stage names a checkpoint `checkpoint-N` (N the optimiser step), the name transformers'
Trainer gives its own; `resolve_resume` finds the one to continue from for all of them and
`begin_run` refuses to mix a fresh run with an earlier one's. Directories named
`step-0000N` by train.py before this release still resume.

A checkpoint of train.py is a directory `<output_dir>/checkpoints/checkpoint-1234/` holding

    model/               the model in the project's Hugging Face format (model.chat_model.save_model)
    optimizer.pt         optimiser state (torch.save of state_dict())
    scheduler.pt         learning-rate scheduler state
    rng_state_<rank>.pt  every random generator of every process (python, numpy, torch, cuda)
    trainer_state.json   step, epoch, batches consumed in the epoch, best BLEU... (written last)

It is written into `.checkpoint-1234.tmp` and renamed when complete, so a kill during a save
leaves the previous checkpoints untouched; a directory without trainer_state.json is
never picked up.

Loading never executes code: every torch.load is `weights_only=True` (the random states are
stored as plain ints and tensors; numpy's arrays of older checkpoints are allowed through
exactly the types transformers' Trainer allows for its rng_state.pth). Before a resume,
`checkpoint_problem` reads every state file of a checkpoint (this format and the Trainer's
`checkpoint-N`) without unpickling it: a file holding pickled code is refused with a
one-line error; a truncated or unreadable one makes `pick_resumable` fall back to the newest
readable checkpoint, moving the damaged one aside as `damaged-<name>`. accelerate's save_state would store the weights a second time in its own
layout (not a loadable model directory), so the non-model state is saved here by hand;
under DeepSpeed (optimizer state partitioned across ranks) accelerate's save_state is used.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from model.common import UserError

from .chat_model import _fsync_tree, save_model

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
# checkpoint-N, and step-0000N as train.py named them before (still resumed)
_NAME = re.compile(r"^(?:checkpoint-|step-)(\d+)$")
# the Trainer's marker of a save it has not finished (transformers 5)
_INCOMPLETE = "checkpoint-is-incomplete.txt"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (trainer_state.json, written last, is there), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name, p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file() and not (p / _INCOMPLETE).exists()]
    return [p for _, _, p in sorted(found)]


def is_checkpoint_dir(path: str | Path) -> bool:
    """A checkpoint itself (checkpoint-N, step-N, or any directory holding trainer_state.json),
    not a directory of them."""
    path = Path(path)
    return bool(_NAME.match(path.name)) or (path / STATE_FILE).is_file()


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict:
    """Every generator's state as ints and tensors: what torch.load(weights_only=True) reads."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),  # (version, tuple of 625 ints, None): plain ints
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, *rest))
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
        for left in [*root.glob(".checkpoint-*.deleting"), *root.glob(".step-*.deleting")]:  # a run killed mid-prune
            shutil.rmtree(left, ignore_errors=True)
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
            _remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-max(1, keep_latest_n)]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


class UnsafeCheckpoint(UserError):
    """A state file holds pickled objects other than tensors: refused, never unpickled."""


class DamagedCheckpoint(UserError):
    """A state file is truncated or unreadable."""


# What a weights_only load may build besides tensors and plain Python values: numpy arrays
# and dtypes, which older checkpoints of this project and the Trainer's rng_state.pth hold
# (the same list as transformers.trainer_pt_utils.safe_globals).
_NUMPY_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                  "numpy.dtype", "numpy.dtypes.UInt32DType"}


def _numpy_safe_globals():
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    return torch.serialization.safe_globals([core.multiarray._reconstruct, np.ndarray, np.dtype,
                                             type(np.dtype(np.uint32))])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def safe_load(path: str | Path):
    """torch.load(weights_only=True); pickled code -> UnsafeCheckpoint, a damaged file -> DamagedCheckpoint."""
    import warnings

    path = Path(path)
    try:
        with _numpy_safe_globals(), warnings.catch_warnings():
            # a plain pickle.dump (protocol 4) makes torch warn before it refuses: one line, not three
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            glob = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise UnsafeCheckpoint(f"refusing to load {path}: it holds pickled objects other than tensors"
                                   f"{f' ({glob.group(1)})' if glob else ''}; a checkpoint must never run code")
        raise DamagedCheckpoint(f"unreadable (truncated or damaged): {path} ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise DamagedCheckpoint(f"unreadable (truncated or damaged): {path} ({_first_line(exc)})") from None


def scan_torch_file(path: str | Path) -> None:
    """Check a torch.save file without unpickling it: the same errors as safe_load.

    torch.serialization.get_unsafe_globals_in_checkpoint reads only the pickle's opcodes
    (nothing is built or run) and fails on a truncated archive (its directory is at the end).
    A file in the legacy, non-zip format is checked by a weights_only load instead.
    """
    path = Path(path)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # not a zip archive: a legacy torch.save, or no torch file at all
        safe_load(path)
        return
    except (RuntimeError, OSError, EOFError) as exc:
        raise DamagedCheckpoint(f"unreadable (truncated or damaged): {path} ({_first_line(exc)})") from None
    unsafe = [g for g in found if g not in _NUMPY_GLOBALS]
    if unsafe:
        raise UnsafeCheckpoint(f"refusing to load {path}: it holds pickled objects other than tensors "
                               f"({', '.join(unsafe[:3])}); a checkpoint must never run code")


def _check_file(path: Path) -> None:
    from safetensors import safe_open

    suffix = path.suffix
    if suffix in (".pt", ".pth", ".bin"):
        scan_torch_file(path)
    elif suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError for a short file
            raise DamagedCheckpoint(f"unreadable (truncated or damaged): {path} ({_first_line(exc)})") from None
    elif suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise DamagedCheckpoint(f"unreadable (truncated or damaged): {path} ({_first_line(exc)})") from None


# training_args.bin: the Trainer pickles its TrainingArguments there for the record and never
# loads it on resume. Partitioned optimiser states (accelerate/ of train.py under DeepSpeed,
# the Trainer's global_stepN/ and FSDP's optimizer_N/) are read by DeepSpeed / FSDP themselves.
_NOT_LOADED_ON_RESUME = {"training_args.bin"}
_PARTITIONED = ("accelerate", "global_step", "optimizer_")


def _partitioned(ckpt: Path) -> bool:
    return any(p.is_dir() and p.name.startswith(_PARTITIONED) for p in ckpt.iterdir())


def _missing(ckpt: Path, files: list[Path]) -> str | None:
    """The first state file a resume needs that `ckpt` lacks (this format, or the Trainer's)."""
    names = {p.name for p in files}
    partitioned = _partitioned(ckpt)
    if not partitioned and not any(p.suffix in (".safetensors", ".bin") or p.name == "model.safetensors.index.json"
                                   for p in files):
        return "model weights"
    ours = (ckpt / "model").is_dir() or (ckpt / "accelerate").is_dir()
    rng = "rng_state_0.pt" if ours else "rng_state.pth"
    needed = [STATE_FILE, "scheduler.pt"] + ([] if partitioned else ["optimizer.pt"])
    for name in needed:
        if name not in names:
            return name
    if not any(n.startswith("rng_state") for n in names):
        return rng
    return None


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """None if every state file of `ckpt` reads; else what is damaged. Pickled code raises UnsafeCheckpoint."""
    ckpt = Path(ckpt)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in _NOT_LOADED_ON_RESUME
                   and not p.relative_to(ckpt).parts[0].startswith(_PARTITIONED))
    missing = _missing(ckpt, files)
    if missing:
        return f"{missing} missing from {ckpt}"
    for path in files:
        try:
            _check_file(path)
        except DamagedCheckpoint as exc:
            return str(exc)
    return None


def pick_resumable(candidates: list[Path], where: str | Path, move_aside: bool = True) -> Path:
    """The newest of `candidates` (oldest first) whose files all read.

    A damaged newer one is renamed `damaged-<name>` (so neither a later resume nor the
    rotation of old checkpoints counts it) with a warning naming it. Of several processes
    only one moves (`move_aside`); the others skip a checkpoint that has gone the same way.
    """
    damaged = []
    for ckpt in reversed(candidates):
        problem = checkpoint_problem(ckpt) if ckpt.is_dir() else "moved aside by another process"
        if problem is None:
            return ckpt
        damaged.append(ckpt.name)
        if not move_aside:
            continue
        aside = ckpt.with_name(f"damaged-{ckpt.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        print(f"warning: checkpoint {ckpt} is damaged ({problem}); moved aside to {aside}, "
              "falling back to the previous one", file=sys.stderr)
    raise UserError(f"no usable checkpoint under {where}: "
                    f"{'damaged: ' + ', '.join(damaged) if damaged else 'none found'}")


def resolve_resume(spec: str | Path, root: str | Path, continue_flag: str) -> Path | None:
    """The checkpoint a run continues from, for every stage.

    `spec`: "" -> None (a fresh run); "last" -> the newest complete checkpoint under `root`
    whose files all read (a damaged newer one is moved aside: pick_resumable); a directory ->
    that checkpoint, which must be complete and read. Nothing is unpickled: the Trainer loads
    its states with weights_only=True too, but a planted pickle would end in its traceback.
    """
    if not spec:
        return None
    flag = continue_flag.split()[0]
    if str(spec) == "last":
        found = list_checkpoints(root)
        if not found:
            raise UserError(f"{flag}: no checkpoint under {root}")
        return pick_resumable(found, root, move_aside=os.environ.get("RANK", "0") == "0")
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"checkpoint to resume from not found: {path}")
    read_state(path)  # a clear error if it is not a complete checkpoint
    return check_resumable(path)


_held_locks: dict[Path, int] = {}  # output directory -> open descriptor holding its lock (this process)


def run_lock_file(out_dir: str | Path) -> Path:
    """The lock file of an output directory: in the temporary directory, named by the directory's
    resolved path, so that a run that fails early leaves nothing in --output_dir."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"chatlm-run-{digest}.lock"


def lock_output_dir(out_dir: str | Path, flag: str = "--output_dir") -> None:
    """Hold the output directory's run lock for the rest of this process, or a one-line error
    naming the run that holds it. Two runs started on one --output_dir (the same command in two
    terminals) would otherwise rotate away each other's checkpoints, interleave their logs, and
    with --overwrite_output_dir delete a running run's files. The kernel drops the lock when the
    process ends, also on kill -9; the small file stays (removing it would race a starting run)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    out = Path(out_dir).resolve()
    if out in _held_locks:  # this process's earlier run on the same directory (tests, notebooks)
        return
    try:
        fd = os.open(run_lock_file(out), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # e.g. another user's lock file: run unlocked rather than not at all
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise UserError(f"another run (process {holder}) is writing to {out}: wait for it to end, stop it, "
                        f"or choose another {flag}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[out] = fd


def check_run_dir(out_dir: str | Path, writes: str = "its best/, checkpoints/ and logs") -> None:
    """--output_dir must not be a model, tokenizer or adapter directory: what a run writes there
    would mix into the model, which no later save could then replace (not its own files)."""
    from .chat_model import output_kind

    held = output_kind(Path(out_dir)) if Path(out_dir).is_dir() else None
    if held:
        raise UserError(f"--output_dir {out_dir} is a {held} directory: a run writes {writes} into --output_dir; "
                        "choose another directory")


def begin_run(out_dir: str | Path, ckpt_root: str | Path, resume_spec: str | Path, overwrite: bool,
              continue_flag: str, own_outputs: tuple[str, ...] = ()) -> Path | None:
    """Before any stage trains: the checkpoint to continue from (resolve_resume), or, for a fresh
    run, the check that it does not mix with an earlier run's files (start_fresh, on one rank).
    Rank 0 holds the output directory's run lock (lock_output_dir) from here on."""
    from .chat_model import check_replaceable

    if resume_spec and overwrite:
        raise UserError(f"{continue_flag.split()[0]} continues a run, --overwrite_output_dir True starts over: "
                        "choose one")
    check_run_dir(out_dir)
    check_replaceable(Path(out_dir) / "best")  # now, not after training
    if os.environ.get("RANK", "0") == "0":
        lock_output_dir(out_dir)
    resume = resolve_resume(resume_spec, ckpt_root, continue_flag)
    if resume is None and os.environ.get("RANK", "0") == "0":  # the other ranks write nothing yet
        start_fresh(out_dir, ckpt_root, overwrite, continue_flag, own_outputs)
    return resume


def check_resumable(ckpt: Path) -> Path:
    """A checkpoint named by the user: every file must read (no fallback to another)."""
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise DamagedCheckpoint(f"cannot resume from {ckpt}: {problem}")
    return ckpt


def _remove(ckpt: Path) -> None:
    """Delete a checkpoint so that a kill never leaves part of it under its own name.

    rmtree deletes file by file: killed half-way (measured: benchmarks/bench_reliability.py,
    one of 4 kill -9s) it left a step-N with trainer_state.json but no weights. Renamed
    first, a leftover is a hidden `.checkpoint-N.deleting` that the next save removes.
    """
    trash = ckpt.with_name(f".{ckpt.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(ckpt, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_state(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        raise UserError(f"not a complete training checkpoint (no {STATE_FILE}): {ckpt}")
    try:
        return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DamagedCheckpoint(f"unreadable (truncated or damaged): {ckpt / STATE_FILE} ({_first_line(exc)})") from None


def load_optimizer_and_scheduler(accelerator, ckpt: str | Path, optimizer, scheduler) -> None:
    ckpt = Path(ckpt)
    if _is_deepspeed(accelerator):
        accelerator.load_state(str(ckpt / "accelerate"))
    else:
        optimizer.load_state_dict(safe_load(ckpt / "optimizer.pt"))
    scheduler.load_state_dict(safe_load(ckpt / "scheduler.pt"))


def load_rng(accelerator, ckpt: str | Path) -> None:
    path = Path(ckpt) / f"rng_state_{accelerator.process_index}.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt} has no random state for rank {accelerator.process_index}")
    set_rng_state(safe_load(path))


# --- a fresh run next to an earlier one -------------------------------------------------------

# Checkpoint directories a run writes (and their leftovers): checkpoint-N (step-N before),
# .checkpoint-N.tmp / .deleting of train.py, tmp-checkpoint-N of the Trainer, and any of them
# moved aside as damaged.
_RUN_CHECKPOINT = re.compile(r"^(damaged-)?(step-\d+|checkpoint-\d+)$|^\.(step|checkpoint)-\d+\.(tmp|deleting)$"
                             r"|^tmp-checkpoint-\d+$")


def run_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _RUN_CHECKPOINT.match(p.name))


def start_fresh(out_dir: str | Path, ckpt_root: str | Path, overwrite: bool, continue_flag: str,
                own_outputs: tuple[str, ...] = ()) -> None:
    """Before a fresh (not resumed) run: refuse to mix with an earlier run's checkpoints.

    With `overwrite` (--overwrite_output_dir True, as Hugging Face's flag) the earlier run's
    checkpoints and the outputs named in `own_outputs` (globs under `out_dir`; a directory
    only when this project wrote it) are removed; nothing else in the directories is touched.
    """
    from .chat_model import check_replaceable

    out_dir, ckpt_root = Path(out_dir), Path(ckpt_root)
    found = run_checkpoints(ckpt_root)
    if found and not overwrite:
        raise UserError(f"{ckpt_root} already holds checkpoints of an earlier run ({found[-1].name}): continue it "
                        f"with {continue_flag}, start over with --overwrite_output_dir True, or choose another "
                        "--output_dir")
    if not overwrite:
        return
    outputs = [p for pattern in own_outputs for p in sorted(out_dir.glob(pattern))]
    for p in outputs:
        if p.is_dir() and not p.is_symlink():
            check_replaceable(p)  # a directory the project did not write stays, with an error
    for p in found:
        shutil.rmtree(p)
    for p in outputs:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if found or outputs:
        print(f"--overwrite_output_dir: removed {len(found)} checkpoint(s) and {len(outputs)} output(s) "
              f"of an earlier run from {out_dir}", file=sys.stderr)
