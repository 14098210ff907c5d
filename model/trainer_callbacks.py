"""Callbacks that the two transformers-Trainer paths share (model/hf_seq2seq.py for
pre_train.py / sft_train.py, model/dpo.py for dpo_train.py):

- `RunLogCallback`: the project's loss log (model/run_log.py: train_loss.csv, eval.csv),
  trimmed on resume, with the last step always logged;
- `ThroughputCallback`: seconds spent in training steps, for tokens/s in the run summary.

    trainer = Trainer(..., callbacks=[RunLogCallback(out_dir), ThroughputCallback()])
"""
from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback

from .run_log import RunLog


class RunLogCallback(TrainerCallback):
    """Each training log to train_loss.csv, each evaluation to eval.csv (model.run_log's
    format); `extra` names the Trainer's own figures to keep (an evaluation's under
    "eval_<name>"). On a resumed run the rows the interrupted run logged after the resumed
    step go first, so the files read as one uninterrupted run."""

    def __init__(self, out_dir: str | Path, train_extra: tuple[str, ...] = ("grad_norm",),
                 eval_extra: tuple[str, ...] = ()):
        self.log = RunLog(out_dir, train_extra, eval_extra)
        self.train_extra, self.eval_extra = train_extra, eval_extra

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.log.start(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:  # the final training loss, whatever logging_steps is
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch)}
        if "loss" in logs:
            self.log.train_row(**row, loss=logs["loss"], lr=logs.get("learning_rate"),
                               **{k: logs.get(k) for k in self.train_extra})
        if "eval_loss" in logs:
            self.log.eval_row(**row, valid_loss=logs["eval_loss"],
                              **{k: logs.get(f"eval_{k}") for k in self.eval_extra})


class ThroughputCallback(TrainerCallback):
    """Time spent on training steps only (data, forward, backward, optimiser).

    Evaluation (with generation), checkpoint saves and logging happen between one step's
    end and the next step's start; they are excluded so that tokens/s measures training and
    can be compared with train.py's.
    """

    def __init__(self):
        self.seconds = 0.0
        self._mark = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds += now - self._mark
        self._mark = now

    def _skip(self, *args, **kwargs):
        self._mark = time.perf_counter()

    on_evaluate = on_save = on_log = _skip
