"""What every stage does the same way around its model: device, precision, stopping on a signal.

    from model.harness import resolve_device, resolve_precision, StopRequest, StopOnSignal

- `resolve_device(name)`: "auto" (CUDA, else MPS, else the CPU) or a device the user named,
  checked; `training_device()` is the one the trainers train on (CUDA, else the CPU).
- `resolve_precision(requested, device)`: a name of config.MIXED_PRECISION (the one table of
  precision names and their dtypes) as it runs on a device: a `Precision` (its torch dtype,
  the accelerate name, the TrainingArguments flags, and the note to print when it differs from
  what was asked). fp32 on a CPU: bf16 matrix products there are hundreds of times slower;
  bf16 on a GPU without bf16 (or on MPS) falls back to fp16.
- `StopRequest`: Ctrl+C (SIGINT) or SIGTERM becomes a flag that a training loop checks after
  each optimiser step; `StopOnSignal` is the same for transformers' Trainer (pre_train.py,
  sft_train.py, dpo_train.py). Every stage then stops the same way: the current step finishes,
  a resumable checkpoint is saved, one line says where and how to continue, and the process
  exits with 128 + the signal's number (130 for Ctrl+C, 143 for SIGTERM), as utils.cli.run_cli
  does for every other script. A second signal gets the handler that was there before (run_cli's
  or Python's): it stops at once, without a checkpoint.
"""
from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn

import torch
from transformers import TrainerCallback

from config import MIXED_PRECISION
from model.common import UserError

DTYPES = {name: getattr(torch, dtype) for name, dtype in MIXED_PRECISION.items()}


def resolve_device(name: str = "auto") -> torch.device:
    """The device for `name` ("auto", "cpu", "cuda", "cuda:N", "mps"); one the machine lacks is a UserError."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device {name!r} (expected auto, cpu, cuda, cuda:N or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"device {name!r} requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def training_device() -> torch.device:
    """Where the trainers (and the evaluations that compare scores) run: CUDA, else the CPU.

    MPS is left out as before: the trainers and their mixed precision were only ever run on
    CUDA and CPUs."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Precision:
    name: str  # what runs: one of config.MIXED_PRECISION ("no" = fp32)
    requested: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def label(self) -> str:
        return "fp32" if self.name == "no" else self.name

    def trainer_flags(self) -> dict:
        """TrainingArguments' bf16 / fp16 flags."""
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}

    @property
    def note(self) -> str | None:
        """One line for the user when the precision differs from the one asked for."""
        if self.name == self.requested:
            return None
        if self.name == "no":
            return f"no CUDA device: running in fp32 instead of {self.requested}"
        return f"bf16 is not supported on this GPU: training in {self.name} instead"


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """`requested` (one of config.MIXED_PRECISION) as it runs on `device`."""
    if requested not in DTYPES:
        raise UserError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {requested!r}")
    kind = torch.device(device).type
    if kind == "cpu" or requested == "no":
        return Precision("no", requested)
    if requested == "bf16" and not (kind == "cuda" and torch.cuda.is_bf16_supported()):
        return Precision("fp16", requested)  # T5 overflows less in bf16, but fp16 is what there is
    return Precision(requested, requested)


class StopRequest:
    """SIGINT/SIGTERM -> `signum`, checked by the loop after each optimiser step.

    Used as a context manager around the training loop (handlers are installed only in the
    main thread, where Python runs them). The first signal sets the flag and puts the previous
    handlers back, so that a second one stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default then
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def exit(self, step: int, checkpoint, continue_flag: str, main_process: bool = True) -> NoReturn:
        exit_after_stop(self.signum, step, checkpoint, continue_flag, main_process)


def exit_after_stop(signum: int, step: int, checkpoint, continue_flag: str, main_process: bool = True) -> NoReturn:
    """The one way a stage ends after a stop: one line (from the main process), exit 128 + signal."""
    if main_process:
        print(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}; "
              f"continue with {continue_flag}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


class StopOnSignal(TrainerCallback):
    """StopRequest for transformers' Trainer: after the step in which a signal came, the Trainer
    saves its checkpoint and stops; the caller then calls `stop.exit(...)`.

    transformers' own enable_jit_checkpoint handles SIGTERM only and saves before the optimiser
    step; this keeps both signals and the Trainer's normal checkpoint path.
    """

    def __init__(self):
        self.stop = StopRequest()

    @property
    def requested(self) -> bool:
        return bool(self.stop.signum)

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.signum:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.__exit__()
