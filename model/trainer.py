"""The project's own accelerate trainer: text-to-text pretraining and `--is_finetune` SFT.

Used by train.py (`python train.py train|test`, `accelerate launch ./train.py train`,
`torchrun --nproc_per_node 2 train.py train`). What it adds over a plain loop:

- data from model/dataset.py in memory or streamed, each rank its own share, optional
  length grouping; throughput counted in real (non-padding) tokens;
- Adafactor (transformers) or AdamW, OneCycleLR from learn_rate to learn_rate*div_factor,
  gradient accumulation, clipping at 1.0, mixed precision on GPU (fp32 on CPU);
- rich progress bars, a log file, a CSV of losses, a PNG loss curve;
- evaluation each epoch: validation loss and corpus BLEU-4 of greedy generations over the
  whole validation set (gathered from every rank), best model by BLEU at <output_dir>/best;
- checkpoints every save_steps, at each epoch end and on Ctrl+C/SIGTERM (model/checkpoint.py,
  model/harness.py) and an exact resume (`is_keep_training`): model, optimiser, scheduler,
  random states and the position in the data, mid-epoch included.

transformers' Trainer is the other path (pre_train.py); this loop exists because the
original project trained with its own accelerate loop and because a stateless per-epoch
data order (model/dataset.py) is what makes its resume exact.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import torch

from model.common import UserError, atomic_write_text, is_given, require_file

from . import checkpoint as ckpt_io
from .chat_model import (build_model, check_vocab, load_model, load_model_and_tokenizer, load_model_config,
                         load_tokenizer, save_model, weights_config_file)
from .dataset import Collator, Prefetcher, TokenizedPairs, open_training_data
from .harness import StopRequest, exit_after_stop, resolve_precision, training_device
from .pairs import check_parquet
from .run_log import EVAL_CSV, PLOT_FILE, TRAIN_CSV, RunLog, last_value, plot_losses, read_rows
from .run_summary import SUMMARY_FILE, RunSummary
from .tokenizer import tokenizer_dir_for

CONTINUE_FLAG = "--is_keep_training True"
# what a run writes under <output_dir> besides checkpoints: --overwrite_output_dir removes these
OWN_OUTPUTS = (TRAIN_CSV, EVAL_CSV, "train.log", "train-rank*.log", PLOT_FILE, SUMMARY_FILE, "best")


def freeze_embedding_and_encoder(model) -> None:
    """SFT setting of the original: only the decoder learns (the tied LM head is the embedding)."""
    for p in model.shared.parameters():
        p.requires_grad_(False)
    for p in model.encoder.parameters():
        p.requires_grad_(False)


def adafactor_kwargs(optimizer: str) -> dict:
    """Adafactor settings for "adafactor" and "adafactor_scaled", shared with the HF path.

    The learning rate is fixed (our schedulers drive it). "adafactor_scaled" also scales each
    update by the parameter's RMS, as T5 was trained: T5 initialises its embeddings with std
    1, the other weights with std ~d^-0.5, so with a plain learning rate the embeddings of a
    model trained from scratch move ~10x slower than the rest; measured on the quickstart's
    SFT from random init, sentiment accuracy after 600 steps went 0.66 (AdamW 1e-3) -> 0.81.
    """
    return dict(scale_parameter=optimizer == "adafactor_scaled", relative_step=False, warmup_init=False)


def make_optimizer(cfg, params):
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learn_rate)
    from .adafactor import Adafactor

    return Adafactor(params, lr=cfg.learn_rate, **adafactor_kwargs(cfg.optimizer))


def make_scheduler(cfg, optimizer, total_steps: int):
    # OneCycleLR starts at max_lr / div_factor: the original's 1e-4 -> 5e-3 with the defaults.
    # OneCycleLR divides by (pct_start * total - 1): the warm-up must span 2+ steps, so a
    # run shorter than 4 steps simply ends before its schedule does
    total_steps = max(total_steps, 4)
    pct_start = min(0.5, max(cfg.warmup_steps, 2) / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.learn_rate * cfg.div_factor, total_steps=total_steps,
        pct_start=pct_start, div_factor=cfg.div_factor, cycle_momentum=False)


@dataclass
class _Meter:
    """This rank's tokens and seconds: in total, and per logging window for tokens/s and the
    share of time spent waiting for data. Evaluation and checkpoints are not training time."""
    train_seconds: float = 0.0
    tokens: int = 0
    wait_seconds: float = 0.0  # waited for batches, epochs finished
    window_tokens: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    wait_at_window: float = 0.0
    stretch_start: float = 0.0  # the current stretch of training steps
    pending: list = field(default_factory=list)  # the losses of the steps not yet logged, on the device

    def start_stretch(self) -> None:
        self.stretch_start = time.perf_counter()

    def close_window(self, wait_now: float) -> tuple[int, float, float]:
        """End the logging window: (its tokens, its seconds, its seconds of waiting for data);
        `wait_now` is the current epoch's wait so far."""
        now = time.perf_counter()
        self.train_seconds += now - self.stretch_start
        self.stretch_start = now
        waited = self.wait_seconds + wait_now - self.wait_at_window
        self.wait_at_window = self.wait_seconds + wait_now
        tokens, seconds = self.window_tokens, max(now - self.window_start, 1e-9)
        self.tokens += tokens
        self.window_tokens, self.window_start = 0, now
        return tokens, seconds, waited

    def end_stretch(self) -> None:
        self.train_seconds += time.perf_counter() - self.stretch_start
        self.tokens += self.window_tokens
        self.window_tokens = 0


def _accumulation_groups(batches, first: int, ga: int, n_batches: int):
    """(index of the last batch, the micro-batches) of each optimiser step of an epoch: `ga`
    batches, fewer at the epoch's end; `first` (where a resumed epoch starts) begins a group."""
    group = []
    for bi, batch in enumerate(batches, start=first):
        group.append(batch)
        start = bi - bi % ga
        if bi - start == min(ga, n_batches - start) - 1:
            yield bi, group
            group = []


def _float(row: dict, key: str) -> float | None:
    return float(row[key]) if row.get(key) else None


def _device_batch(batch: dict, device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}


class ChatTrainer:
    """One training (or test) run of TrainConfig `cfg`.

    `callbacks` are called as fn(trainer, step) after every optimiser step (on every rank);
    they may stop a run the way a signal does, e.g. os.kill(os.getpid(), signal.SIGTERM).
    """

    def __init__(self, cfg, callbacks: list[Callable] | None = None):
        self.cfg = cfg  # its settings were checked when it was made (config.py)
        self.callbacks = list(callbacks or [])
        self.out = Path(cfg.output_dir)
        # train_state_dir, as in the original, is where the training state is written and read
        # back; naming one checkpoint (step-N) resumes from it and writes under <output_dir>
        state_dir = Path(cfg.train_state_dir) if cfg.train_state_dir else None
        self.explicit_resume = state_dir if state_dir is not None and ckpt_io.is_checkpoint_dir(state_dir) else None
        self.ckpt_root = state_dir if state_dir is not None and self.explicit_resume is None \
            else self.out / "checkpoints"

    # ----------------------------------------------------------------------------- setup
    def _accelerator(self):
        from accelerate import Accelerator

        device = training_device()
        gpu = device.type == "cuda"
        self.precision = precision = resolve_precision(self.cfg.mixed_precision, device)
        if precision.note and os.environ.get("RANK", "0") == "0":
            print(precision.note, file=sys.stderr)
        if not gpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            # with DeepSpeed 0.19.8 installed, Accelerator() on a CPU-only machine hangs in
            # DeepSpeed's CPU-accelerator start-up; cpu=True runs plain MULTI_CPU instead
            print("warning: DeepSpeed needs CUDA GPUs; running without it (MULTI_CPU, gloo)", file=sys.stderr)
        # cpu=True is what makes accelerate read torchrun's WORLD_SIZE as MULTI_CPU (gloo)
        # gradient accumulation is the loop's own (see _loop); only DeepSpeed's engine, which
        # accumulates by itself, is told the count (its config may say "auto")
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        acc = Accelerator(cpu=not gpu, mixed_precision=precision.name,
                          gradient_accumulation_steps=self.cfg.gradient_accumulation_steps if deepspeed else 1)
        return acc

    def _logger(self, accelerator) -> logging.Logger:
        log = logging.getLogger(f"chatlm.trainer.{id(self)}")
        log.setLevel(logging.INFO)
        log.propagate = False
        self.out.mkdir(parents=True, exist_ok=True)
        name = "train.log" if accelerator.is_main_process else f"train-rank{accelerator.process_index}.log"
        handler = logging.FileHandler(self.out / name, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        return log

    def _check_inputs(self, tokenizer, model_config) -> None:
        cfg = self.cfg
        check_parquet(cfg.train_file, "training data (--train_file)")
        check_parquet(cfg.validation_file, "validation data (--validation_file)")
        check_vocab(tokenizer, model_config, "--tokenizer_dir vs the model")

    def _start(self) -> Path | None:
        """Resume (is_keep_training: the checkpoint named, else the newest readable one under
        ckpt_root) or start fresh without mixing with an earlier run's files."""
        cfg = self.cfg
        spec = (self.explicit_resume or "last") if cfg.is_keep_training else ""
        return ckpt_io.begin_run(self.out, self.ckpt_root, spec, cfg.overwrite_output_dir, CONTINUE_FLAG,
                                 OWN_OUTPUTS)

    # ----------------------------------------------------------------------------- train
    def train(self) -> dict:
        """Train; returns the run summary (model.run_summary.RunSummary) as a dict."""
        self._wall_start = time.perf_counter()
        cfg = self.cfg
        resume = self._start()
        # a fine-tuned model keeps the tokenizer of the model it started from
        tokenizer = load_tokenizer(tokenizer_dir_for(cfg.finetune_from_ckp_file if cfg.is_finetune else None, cfg))
        model_source, model_config, weights_config = self._model_source(resume)
        self._check_inputs(tokenizer, model_config)

        accelerator = self._accelerator()
        self.accelerator = accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        model = build_model(cfg.model_config_file) if model_source is None else \
            load_model(model_source, config_file=weights_config)
        model.set_attn_implementation(cfg.attn_implementation)
        if cfg.is_finetune:
            freeze_embedding_and_encoder(model)

        source, valid, collate = self._data(tokenizer, rank, world)
        ga = cfg.gradient_accumulation_steps
        batches_per_epoch = source.num_batches()
        steps_per_epoch = math.ceil(batches_per_epoch / ga)
        total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
        n_epochs = math.ceil(total_steps / steps_per_epoch)

        optimizer = make_optimizer(cfg, model.parameters())
        scheduler = make_scheduler(cfg, optimizer, total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "best_bleu": -1.0, "last_eval_step": -1,
                 "world_size": world, "batch_size_per_gpu": cfg.batch_size_per_gpu, "gradient_accumulation_steps": ga,
                 "seed": cfg.seed, "total_steps": total_steps, "streaming": type(source).__name__,
                 "group_by_length": cfg.group_by_length, "train_file": str(cfg.train_file)}
        log = self._logger(accelerator)
        log.info("rank %d of world_size=%d distributed_type=%s device=%s mixed_precision=%s data=%s rows_batches=%d",
                 rank, world, accelerator.distributed_type, accelerator.device, accelerator.mixed_precision,
                 type(source).__name__, batches_per_epoch)
        if resume is not None:
            self._resume_state(resume, state, optimizer, scheduler, log)
        self.run_log = RunLog(self.out, eval_extra=("bleu4", "n_samples"))
        if accelerator.is_main_process:
            # evaluations up to the checkpoint's last one: a run killed after an evaluation but
            # before the checkpoint that follows it must not keep that row, or it is logged twice
            self.run_log.start(state["global_step"] if resume else 0, max(state["last_eval_step"], 0) if resume else 0)
        self.resumed_from, self.start_step = resume, state["global_step"]
        if resume is not None:
            ckpt_io.load_rng(accelerator, resume)  # last: nothing may draw random numbers after this

        self.model, self.optimizer, self.scheduler, self.tokenizer = model, optimizer, scheduler, tokenizer
        self.state, self.log = state, log
        summary = self._loop(source, valid, collate, n_epochs, total_steps, batches_per_epoch)
        for h in list(log.handlers):
            h.close()
            log.removeHandler(h)
        return summary

    def _resume_state(self, resume: Path, state: dict, optimizer, scheduler, log) -> None:
        """Load the optimiser and scheduler of checkpoint `resume` and its place in the data into
        `state`, after checking it was trained with the settings that decide the data order."""
        saved = ckpt_io.read_state(resume)
        for key in ("world_size", "batch_size_per_gpu", "gradient_accumulation_steps", "seed", "streaming",
                    "group_by_length"):
            if saved.get(key) != state[key]:
                raise UserError(f"cannot resume {resume} exactly: it was trained with {key}={saved.get(key)}, "
                                f"this run has {key}={state[key]}")
        ckpt_io.load_optimizer_and_scheduler(self.accelerator, resume, optimizer, scheduler)
        state.update({k: saved[k] for k in ("global_step", "epoch", "batch_in_epoch", "best_bleu", "last_eval_step")})
        if saved["total_steps"] != state["total_steps"]:
            log.warning("resuming with total_steps %d, the checkpoint's schedule has %d",
                        state["total_steps"], saved["total_steps"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume, state["global_step"],
                 state["epoch"], state["batch_in_epoch"])

    def _model_source(self, resume: Path | None) -> tuple[Path | None, object, str | None]:
        """(what to load the model from, None for a fresh one; its config; the config file that
        describes a .bin / .safetensors weights file, when --model_config_file is given)."""
        cfg = self.cfg
        weights_config = cfg.model_config_file if is_given(cfg, "model_config_file") else None
        if resume is not None:
            return resume / "model", load_model_config(resume / "model" / "config.json"), weights_config
        if cfg.is_finetune:
            source = Path(cfg.finetune_from_ckp_file)
            if not source.exists():
                raise UserError(f"--finetune_from_ckp_file not found: {source}")
            return source, load_model_config(source / "config.json" if source.is_dir()
                                             else weights_config_file(source, weights_config)), weights_config
        return None, load_model_config(require_file(cfg.model_config_file, "--model_config_file")), weights_config

    def _data(self, tokenizer, rank: int, world: int):
        """(this rank's training batches, the validation set, the collator)."""
        cfg = self.cfg
        source = open_training_data(cfg.train_file, tokenizer, cfg.max_seq_len, cfg.batch_size_per_gpu, cfg.seed,
                                    cfg.streaming, cfg.dataloader_buffer_size, rank, world, cfg.group_by_length)
        valid = TokenizedPairs(cfg.validation_file, tokenizer, cfg.max_seq_len, keep_texts=True,
                               max_rows=cfg.eval_max_samples if cfg.eval_max_samples > 0 else None)
        return source, valid, Collator(tokenizer.pad_token_id, tokenizer, cfg.max_seq_len)

    def _progress(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        disable=not self.accelerator.is_main_process)

    def _checkpoint(self) -> Path:
        acc = self.accelerator
        path = ckpt_io.save_checkpoint(acc, self.ckpt_root, self.state["global_step"], self.model, self.tokenizer,
                                       self.optimizer, self.scheduler, dict(self.state), self.cfg.keep_latest_n_ckp)
        self.log.info("checkpoint saved: %s", path)
        return path

    def _should_stop(self, stop: StopRequest) -> int:
        """The signal number if any rank was asked to stop (all ranks must agree), else 0."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return stop.signum
        flag = torch.tensor([stop.signum], device=acc.device)
        anyone = int(acc.reduce(flag, reduction="sum").item())
        return stop.signum or (int(signal.SIGTERM) if anyone else 0)

    def _train_forward(self):
        """The module the training step calls: the prepared model, or (--torch_compile) a
        torch.compile wrapper of it. Evaluation, generation and checkpoints keep using the
        uncompiled model (same weights), so generation's changing shapes never recompile."""
        if not self.cfg.torch_compile:
            return self.model
        return torch.compile(self.model, backend=self.cfg.torch_compile_backend)

    def _micro_step(self, forward, batch: dict, scale: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its detached, scaled loss."""
        acc = self.accelerator
        with contextlib.nullcontext() if sync else acc.no_sync(self.model):
            with acc.autocast():
                loss = forward(**_device_batch(batch, acc.device)).loss * scale
            acc.backward(loss)
        return loss.detach()

    def _optimizer_step(self, trainable) -> None:
        self.accelerator.clip_grad_norm_(trainable, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _loop(self, source, valid, collate, n_epochs: int, total_steps: int, batches_per_epoch: int) -> dict:
        """Epochs of optimiser steps up to total_steps; an evaluation and a checkpoint at each
        epoch's end and at the last step."""
        state, meter = self.state, _Meter()
        self._forward = self._train_forward()
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        with StopRequest() as stop, self._progress() as progress:
            bars = (progress.add_task("epoch", total=n_epochs, completed=state["epoch"], info=""),
                    progress.add_task("steps", total=total_steps, completed=state["global_step"], info=""))
            while state["epoch"] < n_epochs and state["global_step"] < total_steps:
                self._train_epoch(source, collate, batches_per_epoch, total_steps, meter, stop, progress, bars[1])
                self._maybe_end_epoch(valid, collate, batches_per_epoch, meter, progress, bars[0])
            if state["last_eval_step"] != state["global_step"]:  # stopped by max_steps mid-epoch
                self._evaluate_and_keep_best(valid, collate, progress, state["epoch"])
                self._checkpoint()
        return self._finish(meter.train_seconds, meter.tokens, meter.wait_seconds)

    def _train_epoch(self, source, collate, batches_per_epoch: int, total_steps: int, meter: "_Meter", stop,
                     progress, bar) -> None:
        """The optimiser steps of the current epoch, from where it stands to its end or total_steps."""
        state = self.state
        epoch, skip = state["epoch"], state["batch_in_epoch"]
        meter.start_stretch()
        pin = self.accelerator.device.type == "cuda"  # page-locked batches: the copy to the GPU runs asynchronously
        with Prefetcher(source.batches(epoch, skip), collate, pin=pin) as batches:
            groups = _accumulation_groups(batches, skip, self.cfg.gradient_accumulation_steps, batches_per_epoch)
            for last, group in groups:
                meter.pending.append(self._train_step(group))
                meter.window_tokens += sum(batch["n_tokens"] for batch in group)
                state["global_step"] += 1
                state["batch_in_epoch"] = last + 1
                progress.update(bar, advance=1)
                for fn in self.callbacks:
                    fn(self, state["global_step"])
                self._maybe_log(meter, batches.wait_s, epoch, total_steps, progress, bar)
                self._maybe_stop(stop, meter, total_steps)
                self._maybe_save()
                if state["global_step"] >= total_steps:
                    break
            meter.wait_seconds += batches.wait_s
        meter.end_stretch()

    def _train_step(self, group: list[dict]) -> torch.Tensor:
        """One optimiser step over a group of micro-batches; returns its loss (on the device).

        Gradient accumulation is this loop's alone (the Accelerator is built with 1): each
        micro-batch's loss is divided by the size of its group, which is shorter at the end
        of an epoch, and DDP syncs on the group's last one. DeepSpeed's engine accumulates
        and divides by its own count (its config's gradient_accumulation_steps) instead.
        """
        scale = 1.0 if self.accelerator.distributed_type == "DEEPSPEED" else 1.0 / len(group)
        loss = None
        for i, batch in enumerate(group):
            part = self._micro_step(self._forward, batch, scale, sync=i == len(group) - 1)
            loss = part if loss is None else loss + part
        self._optimizer_step(self._trainable)
        return loss

    def _maybe_log(self, meter: "_Meter", wait_now: float, epoch: int, total_steps: int, progress, bar) -> None:
        """Every logging_steps and at the last step: the losses since the last log, tokens/s."""
        gs = self.state["global_step"]
        if gs % self.cfg.logging_steps and gs != total_steps:
            return
        tokens, seconds, waited = meter.close_window(wait_now)
        self._log_losses(meter.pending, epoch, tokens * self.accelerator.num_processes / seconds, waited / seconds,
                         progress, bar)
        meter.pending = []

    def _maybe_stop(self, stop: StopRequest, meter: "_Meter", total_steps: int) -> None:
        """On Ctrl+C / SIGTERM (any rank's): a checkpoint and SystemExit (self._interrupted).
        With several ranks they agree only every few steps (a collective each time)."""
        gs = self.state["global_step"]
        check_every = 1 if self.accelerator.num_processes == 1 else min(self.cfg.logging_steps, 10)
        if gs % check_every == 0 or gs == total_steps:
            signum = self._should_stop(stop)
            if signum:
                self._interrupted(signum, meter.pending)

    def _maybe_save(self) -> None:
        if self.state["global_step"] % self.cfg.save_steps == 0:
            self._checkpoint()

    def _maybe_end_epoch(self, valid, collate, batches_per_epoch: int, meter: "_Meter", progress, bar) -> None:
        """After an epoch's last batch: the next epoch, an evaluation and a checkpoint."""
        state = self.state
        if state["batch_in_epoch"] < batches_per_epoch:  # stopped by max_steps mid-epoch
            return
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        progress.update(bar, advance=1)
        self._evaluate_and_keep_best(valid, collate, progress, state["epoch"] - 1)
        self._checkpoint()
        meter.window_start = time.perf_counter()  # evaluation is not training time

    def _log_losses(self, pending_losses, epoch: int, tps: float, wait_share: float, progress, task) -> None:
        """One log line and a CSV row per step since the last log (the only device sync per log)."""
        gs = self.state["global_step"]
        losses = torch.stack(pending_losses).float().cpu().tolist()
        lr = self.scheduler.get_last_lr()[0]
        if self.accelerator.is_main_process:
            for k, value in enumerate(losses):
                self.run_log.train_row(step=gs - len(losses) + 1 + k, epoch=epoch, loss=value, lr=f"{lr:.6g}",
                                       tokens_per_s=f"{tps:.1f}")
        mean = sum(losses) / len(losses)
        self.log.info("step %d epoch %d loss %.4f lr %.3g tokens/s %.0f data wait %.1f%%", gs, epoch, mean, lr, tps,
                      100 * wait_share)
        progress.update(task, info=f"loss {mean:.4f} lr {lr:.2e} {tps:,.0f} tok/s wait {100 * wait_share:.1f}%")

    def _interrupted(self, signum: int, pending_losses) -> NoReturn:
        if pending_losses and self.accelerator.is_main_process:  # keep the CSV complete up to the checkpoint
            gs = self.state["global_step"]
            losses = torch.stack(pending_losses).float().cpu().tolist()
            for k, value in enumerate(losses):
                self.run_log.train_row(step=gs - len(losses) + 1 + k, epoch=self.state["epoch"], loss=value)
        path = self._checkpoint()
        self.log.info("stopped by signal %d at step %d; checkpoint saved to %s", signum, self.state["global_step"], path)
        exit_after_stop(signum, self.state["global_step"], path, CONTINUE_FLAG, self.accelerator.is_main_process)

    def _finish(self, train_time: float, tokens_local: int, wait_s: float) -> dict:
        acc = self.accelerator
        tokens = int(acc.reduce(torch.tensor([tokens_local], device=acc.device), reduction="sum").item())
        acc.wait_for_everyone()  # the main process's log rows are all written
        summary = self._summary(train_time, tokens, wait_s)
        if acc.is_main_process:
            summary.write(self.out)
            plot_losses(self.out)
            print(f"trained {summary.steps} steps, {summary.tokens_per_s:.0f} tokens/s (waiting for data "
                  f"{100 * summary.details['data_wait_share']:.1f}% of the time); best BLEU-4 "
                  f"{summary.eval_bleu4:.4f} at {summary.model_dir}")
        acc.wait_for_everyone()
        return summary.to_dict()

    def _summary(self, train_time: float, tokens: int, wait_s: float) -> RunSummary:
        """The figures of this run; the losses from its log, which spans the resumed runs too."""
        acc, st = self.accelerator, self.state
        # best/ is the first evaluation with the highest BLEU-4 (a later one must beat it)
        best = max(read_rows(self.out / EVAL_CSV), key=lambda r: float(r["bleu4"]), default={})
        return RunSummary(
            stage="sft" if self.cfg.is_finetune else "pretrain", trainer="train.py", steps=st["global_step"],
            steps_this_run=st["global_step"] - self.start_step, train_tokens=tokens,
            train_seconds=round(train_time, 3), tokens_per_s=round(tokens / max(train_time, 1e-9), 1),
            final_train_loss=last_value(self.out / TRAIN_CSV, "loss"), eval_loss=_float(best, "valid_loss"),
            last_eval_loss=last_value(self.out / EVAL_CSV, "valid_loss"),
            eval_bleu4=st["best_bleu"] if st["best_bleu"] >= 0 else None, model_dir=str(self.out / "best"),
            resumed_from=str(self.resumed_from) if self.resumed_from else None, world_size=acc.num_processes,
            device=str(acc.device), precision=self.precision.label,
            wall_seconds=round(time.perf_counter() - self._wall_start, 3),
            # share of the training time this rank's loop waited for its next batch
            details={"data_wait_share": round(wait_s / max(train_time, 1e-9), 4)})

    # ----------------------------------------------------------------------------- eval
    def _evaluate_and_keep_best(self, valid, collate, progress, epoch: int) -> dict:
        result = evaluate(self.accelerator, self.model, self.tokenizer, valid, collate, self.cfg.batch_size_per_gpu,
                          self.cfg.max_seq_len, progress)
        self.model.train()
        st = self.state
        st["last_eval_step"] = st["global_step"]
        improved = result["bleu4"] > st["best_bleu"]
        if improved:
            st["best_bleu"] = result["bleu4"]
        if self.accelerator.is_main_process:
            self.run_log.eval_row(step=st["global_step"], epoch=epoch, valid_loss=result["loss"],
                                  bleu4=result["bleu4"], n_samples=result["n_samples"])
            if improved:
                save_model(self.accelerator.unwrap_model(self.model), self.out / "best", self.tokenizer)
        self.accelerator.wait_for_everyone()
        self.log.info("eval epoch %d step %d: valid loss %.4f BLEU-4 %.4f (%d samples)%s", epoch, st["global_step"],
                      result["loss"], result["bleu4"], result["n_samples"], " new best" if improved else "")
        if self.accelerator.is_main_process:
            progress.console.print(f"epoch {epoch}: valid loss {result['loss']:.4f}, BLEU-4 {result['bleu4']:.4f}"
                                   f"{' (best, saved)' if improved else ''}")
        return result

    # ----------------------------------------------------------------------------- test
    def test(self) -> dict:
        cfg = self.cfg
        model_dir = Path(cfg.test_model_dir) if cfg.test_model_dir else self.out / "best"
        if not model_dir.exists():
            raise UserError(f"model to test not found: {model_dir} (set --test_model_dir)")
        ckpt_io.check_run_dir(self.out, "test_results.json")
        check_parquet(cfg.test_file, "test data (--test_file)")
        model, tokenizer = load_model_and_tokenizer(model_dir, tokenizer_dir_for(model_dir, cfg))
        self.accelerator = acc = self._accelerator()
        data = TokenizedPairs(cfg.test_file, tokenizer, cfg.max_seq_len, keep_texts=True,
                              max_rows=cfg.eval_max_samples if cfg.eval_max_samples > 0 else None)
        model = acc.prepare(model)
        with self._progress() as progress:
            result = evaluate(acc, model, tokenizer, data, Collator(tokenizer.pad_token_id), cfg.batch_size_per_gpu,
                              cfg.max_seq_len, progress)
        result.update({"model_dir": str(model_dir), "test_file": str(cfg.test_file)})
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "test_results.json", json.dumps(result, ensure_ascii=False, indent=2))
            print(f"test BLEU-4 {result['bleu4']:.4f}  loss {result['loss']:.4f}  ({result['n_samples']} samples, "
                  f"{model_dir}) -> {self.out / 'test_results.json'}")
        return result


@torch.no_grad()
def evaluate(accelerator, model, tokenizer, data: TokenizedPairs, collate, batch_size: int, max_new_tokens: int,
             progress=None) -> dict:
    """Token-averaged loss and corpus BLEU-4 of greedy generations over ALL of `data`.

    Each rank scores rows rank, rank+world, ...; the hypotheses and references of every
    rank are gathered and BLEU is computed once over the whole set.
    """
    from accelerate.utils import gather_object

    from model.generation import generate_batch
    from model.metrics import corpus_bleu4

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(data), world))
    mine.sort(key=lambda i: int(data.lengths[i]))  # similar lengths per batch: less padding
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    hyps, refs, order = [], [], []
    task = progress.add_task("eval", total=math.ceil(len(mine) / batch_size), info="") if progress else None
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        batch = _device_batch(collate([data[i] for i in idx]), accelerator.device)
        with accelerator.autocast():
            out = unwrapped(**batch)
            n = (batch["labels"] != -100).sum()
            loss_sum += torch.stack([out.loss.double() * n, n.double()])
            # the same (already encoded) prompts, padded for generation as every caller pads them
            hyps.extend(generate_batch(unwrapped, tokenizer, [data[i]["input_ids"].tolist() for i in idx],
                                       max_new_tokens))
        refs.extend(data.texts_response[i] for i in idx)
        order.extend(idx)
        if task is not None:
            progress.update(task, advance=1)
    if task is not None:
        progress.remove_task(task)
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    triples = gather_object(list(zip(order, hyps, refs))) if world > 1 else list(zip(order, hyps, refs))
    triples.sort(key=lambda t: t[0])
    bleu = corpus_bleu4([t[1] for t in triples], [t[2] for t in triples])
    return {"loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)), "bleu4": bleu, "n_samples": len(triples)}
