"""The Hugging Face Trainer path: text-to-text training with transformers' Seq2SeqTrainer.

Used by two thin scripts (the logic lives here once):

    python pre_train.py  [--field value ...]   # pretraining from scratch (TrainConfig)
    python sft_train.py  [--field value ...]   # instruction fine-tuning (SFTconfig)

Data: parquet files of `prompt`/`response` strings (SFT also reads JSON / JSON lines with
those keys or BELLE's instruction/input/output, through model.pairs), read with `datasets`, tokenised by `model.dataset.encode_batch` ([EOS]
appended, truncated to `max_seq_len`) and padded per batch by `DataCollatorForSeq2Seq`
(label padding -100). Evaluation, when an eval file is given, computes the loss and,
through `predict_with_generate`, greedy generations scored with corpus BLEU-4.

Outputs under `<output_dir>` (the hand-off convention of config.py):
- `checkpoints/checkpoint-N/`: the Trainer's resumable checkpoints (model, optimiser,
  scheduler, RNG states, trainer_state.json). `--resume_from_checkpoint last` (SFT) or
  `--is_keep_training True` (pretraining) continues from the newest complete one.
- `best/`: the model for the next stage (best eval loss when there is an eval set, else
  the last), written atomically through `model.chat_model.save_model`, with the tokenizer.
- `runs/`: tensorboard logs (`tensorboard --logdir <output_dir>/runs`).
- `train_loss.csv`, `eval.csv`, `loss_curve.png`: the loss log and its plot (model/run_log.py).
- `train_summary.json`: steps, non-padding tokens, tokens/s, final losses, timings
  (model/run_summary.py, the same keys as train.py's and DPO's).

Ctrl+C or SIGTERM stops after the current optimiser step with a checkpoint saved
(model/harness.py: the same in every stage).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.common import UserError, is_given, require_file

from .chat_model import (build_model, check_vocab, count_parameters, fill_special_token_ids, load_model,
                         load_tokenizer, save_model)
from .checkpoint import begin_run, checkpoint_name, is_checkpoint_dir, read_state
from .dataset import encode_batch, report_dataset_cuts
from .harness import StopOnSignal, resolve_precision, training_device
from .pairs import REQUIRED_COLUMNS, BadRows, check_no_nulls, check_parquet, iter_pairs, pair_table, require_rows
from .run_log import EVAL_CSV, PLOT_FILE, TRAIN_CSV, last_value, plot_losses
from .run_summary import SUMMARY_FILE, RunSummary
from .tokenizer import tokenizer_dir_for
from .trainer import adafactor_kwargs

# what a run writes under <output_dir> besides checkpoints: --overwrite_output_dir removes these
OWN_OUTPUTS = ("best", SUMMARY_FILE, TRAIN_CSV, EVAL_CSV, PLOT_FILE, "runs/events.out.tfevents.*")


@dataclass
class Seq2SeqJob:
    """What one Seq2SeqTrainer run needs; built from TrainConfig or SFTconfig below."""
    stage: str
    output_dir: str
    tokenizer_dir: str
    train_file: str
    eval_file: str
    max_seq_len: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    num_train_epochs: float
    max_steps: int
    logging_steps: int
    save_steps: int
    save_total_limit: int
    seed: int
    mixed_precision: str
    optimizer: str = "adamw"
    logging_first_step: bool = True
    group_by_length: bool = False
    eval_max_samples: int = -1
    resume_from_checkpoint: str = ""  # "" | "last" | a checkpoint dir
    checkpoints_dir: str = ""  # where checkpoints are written; "" = <output_dir>/checkpoints
    overwrite_output_dir: bool = False  # a fresh run: remove an earlier run's checkpoints and outputs
    allow_json: bool = False
    model_config_file: str = ""  # pretraining: build a fresh model from this config
    init_model_dir: str = ""  # fine-tuning: load this model (strictly)
    per_sample_loss: bool = False  # training loss = mean over pairs of each pair's token mean
    attn_implementation: str = "sdpa"
    torch_compile: bool = False  # TrainingArguments.torch_compile
    torch_compile_backend: str = "inductor"

    def __post_init__(self):
        # Relative paths from the command line mean the current directory; made absolute
        # once so that messages and train_summary.json name the files unambiguously.
        for name in ("output_dir", "tokenizer_dir", "train_file", "eval_file", "model_config_file",
                     "init_model_dir", "checkpoints_dir"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).expanduser().resolve()))
        if self.resume_from_checkpoint not in ("", "last"):
            self.resume_from_checkpoint = str(Path(self.resume_from_checkpoint).expanduser().resolve())


def job_from_train_config(cfg) -> Seq2SeqJob:
    """Pretraining settings from TrainConfig (the fields train.py reads too).

    TrainConfig describes a OneCycle schedule that peaks at learn_rate * div_factor; the
    Trainer's linear warm-up/decay schedule is given the same peak so both trainers train
    the same model at comparable rates. train_state_dir, as for train.py, is where the
    checkpoints are written and is_keep_training reads them back (a checkpoint dir there:
    resume from it); without it, <output_dir>/checkpoints.
    """
    refuse_train_py_only(cfg)
    state_dir = cfg.train_state_dir
    named = bool(state_dir) and is_checkpoint_dir(state_dir)
    resume = (state_dir if named else "last") if cfg.is_keep_training else ""
    return Seq2SeqJob(checkpoints_dir="" if named else state_dir,
        stage="pretrain", output_dir=cfg.output_dir, tokenizer_dir=cfg.tokenizer_dir,
        train_file=cfg.train_file, eval_file=cfg.validation_file, max_seq_len=cfg.max_seq_len,
        batch_size=cfg.batch_size_per_gpu, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learn_rate * cfg.div_factor, warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_total_limit=cfg.keep_latest_n_ckp, seed=cfg.seed,
        mixed_precision=cfg.mixed_precision, optimizer=cfg.optimizer, group_by_length=cfg.group_by_length,
        eval_max_samples=cfg.eval_max_samples, resume_from_checkpoint=resume,
        overwrite_output_dir=cfg.overwrite_output_dir, model_config_file=cfg.model_config_file,
        attn_implementation=cfg.attn_implementation, torch_compile=cfg.torch_compile,
        torch_compile_backend=cfg.torch_compile_backend)


def refuse_train_py_only(cfg) -> None:
    """TrainConfig fields only train.py acts on: pre_train.py refuses them rather than drop them.

    --streaming no/auto are accepted: datasets reads the parquet file through a memory-mapped
    Arrow copy, never whole into memory, which is what either asks for.
    """
    if cfg.is_finetune:
        raise UserError("pre_train.py trains a fresh model and does not fine-tune: for --is_finetune True use "
                        "train.py (python train.py train --is_finetune True --finetune_from_ckp_file DIR), "
                        "or sft_train.py for instruction fine-tuning")
    if cfg.streaming == "yes":
        raise UserError("pre_train.py does not stream: --streaming yes is train.py's (python train.py train "
                        "--streaming yes); pre_train.py reads parquet through datasets' memory-mapped Arrow cache")
    if is_given(cfg, "test_file"):
        raise UserError("pre_train.py does not test: for --test_file run python train.py test --test_file FILE "
                        "--test_model_dir <output_dir>/best after training")


def job_from_sft_config(cfg) -> Seq2SeqJob:
    """SFT settings from SFTconfig. The tokenizer follows the model to fine-tune (its own,
    unless --tokenizer_dir is given); --model_config_file builds a fresh model when there is
    none, and describes a .bin / .safetensors weights file when given."""
    start = cfg.finetune_from_ckp_file
    return Seq2SeqJob(
        stage="sft", output_dir=cfg.output_dir, tokenizer_dir=str(tokenizer_dir_for(start or None, cfg)),
        train_file=cfg.sft_train_file, eval_file=cfg.sft_eval_file, max_seq_len=cfg.max_seq_len,
        batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, mixed_precision=cfg.mixed_precision,
        optimizer=cfg.optimizer, logging_first_step=cfg.logging_first_step, group_by_length=cfg.group_by_length,
        eval_max_samples=cfg.eval_max_samples, resume_from_checkpoint=cfg.resume_from_checkpoint,
        overwrite_output_dir=cfg.overwrite_output_dir, allow_json=True, init_model_dir=start,
        per_sample_loss=cfg.per_sample_loss, attn_implementation=cfg.attn_implementation,
        torch_compile=cfg.torch_compile, torch_compile_backend=cfg.torch_compile_backend,
        # no model to start from: a fresh one (the "from random initialisation" baseline)
        model_config_file=cfg.model_config_file if not start or is_given(cfg, "model_config_file") else "")


# --- checks that run before anything heavy is imported ----------------------------------

def check_job(job: Seq2SeqJob) -> None:
    """Every input file that can be checked without loading a model (the settings were
    checked when the TrainConfig / SFTconfig it came from was made)."""
    check_pairs_file(job.train_file, "train", job.allow_json)
    if job.eval_file:
        check_pairs_file(job.eval_file, "eval", job.allow_json)
    if job.model_config_file:
        require_file(job.model_config_file, "model config file")
    if job.init_model_dir and not Path(job.init_model_dir).exists():
        raise UserError(f"model to fine-tune not found: {job.init_model_dir}")
    tok = Path(job.tokenizer_dir)
    if not (tok / "tokenizer.json").is_file() and not (tok / "tokenizer_config.json").is_file():
        raise UserError(f"no tokenizer found in {tok} (train one with train_tokenizer.py)")


def _is_json(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".json", ".jsonl")


def check_pairs_file(path: str | Path, what: str, allow_json: bool) -> Path:
    """A parquet file checked by model.pairs.check_parquet, or (SFT) an existing JSON file.

    JSON content is checked when it is loaded (load_pair_dataset): reading it here would mean
    parsing it twice.
    """
    if _is_json(path):
        if not allow_json:
            raise UserError(f"{what} file must be parquet (prompt/response columns): {path}")
        return require_file(path, f"{what} file")
    if Path(path).suffix.lower() != ".parquet" and Path(path).is_file():
        raise UserError(f"{what} file must be .parquet{' or .json/.jsonl' if allow_json else ''}: {path}")
    return check_parquet(path, what)


# --- data ---------------------------------------------------------------------------------

def load_pair_dataset(path: str | Path, what: str):
    """A datasets.Dataset with string `prompt` and `response` columns (nothing else).

    Parquet is read by datasets (memory-mapped) and a null stops the run (the project wrote
    the file); JSON is read by model.pairs.iter_pairs, as every stage reads it (BELLE records
    too): a malformed record is reported with its line and skipped.
    """
    import datasets
    from datasets.table import InMemoryTable

    # Quiet while reading, so that a bad file ends in one line on stderr.
    datasets.disable_progress_bars()
    try:
        if _is_json(path):
            bad = BadRows()
            table = pair_table(iter_pairs(path, bad))
            require_rows(table.num_rows, bad, path, f"{what} file", "prompt/response")
            return datasets.Dataset(InMemoryTable(table))
        ds = datasets.Dataset.from_parquet(str(path), columns=list(REQUIRED_COLUMNS))
        check_no_nulls(ds.data, path, what)
        return ds.select_columns(list(REQUIRED_COLUMNS))
    finally:
        datasets.enable_progress_bars()


def tokenize_pairs(ds, tokenizer, max_seq_len: int, what: str):
    """The tokenised set; says how many texts --max_seq_len cuts (report_dataset_cuts)."""
    ds = ds.map(lambda b: encode_batch(tokenizer, b["prompt"], b["response"], max_seq_len),
                batched=True, remove_columns=ds.column_names, desc=f"tokenising {what}")
    return report_dataset_cuts(ds, what, max_seq_len)


# --- Trainer pieces -------------------------------------------------------------------------

def _adafactor(job: Seq2SeqJob):
    """Both Adafactor variants as train.py builds them, handed to the Trainer as class +
    kwargs: TrainingArguments' "adafactor" fixes scale_parameter=False, so
    "adafactor_scaled" has no name there."""
    if not job.optimizer.startswith("adafactor"):
        return None
    from .adafactor import Adafactor

    return Adafactor, {"lr": job.learning_rate, **adafactor_kwargs(job.optimizer)}


def _bleu_metric(tokenizer):
    import numpy as np

    from model.metrics import corpus_bleu4

    pad = tokenizer.pad_token_id

    def compute_metrics(pred):
        preds = np.where(pred.predictions < 0, pad, pred.predictions)
        labels = np.where(pred.label_ids < 0, pad, pred.label_ids)
        hyps = tokenizer.batch_decode(preds, skip_special_tokens=True)
        refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {"bleu4": corpus_bleu4(hyps, refs)}

    return compute_metrics


# --- the run --------------------------------------------------------------------------------

def run(job: Seq2SeqJob) -> dict:
    """Train, write `<output_dir>/best`, the loss log and the summary; returns the summary as
    a dict on the main process ({} on the others)."""
    wall_start = time.perf_counter()
    check_job(job)
    resume = _start(job)
    model, tokenizer, train_ds, eval_ds = _load(job)
    model_generation = model.generation_config  # the eval settings the Trainer installs are not delivered
    trainer, throughput, stop_on_signal = _make_trainer(job, model, tokenizer, train_ds, eval_ds)
    print(f"{job.stage}: {count_parameters(model):,} parameters, {len(train_ds):,} training pairs"
          f"{f', {len(eval_ds):,} eval pairs' if eval_ds is not None else ''}, device {trainer.args.device}"
          f"{f', resuming from {resume}' if resume else ''}")
    start_step = read_state(resume)["global_step"] if resume else 0
    result = trainer.train(resume_from_checkpoint=resume)
    tokens = trainer.accelerator.reduce(torch.tensor(trainer.trained_tokens, device=trainer.args.device), "sum")
    if stop_on_signal.requested:
        step = trainer.state.global_step
        stop_on_signal.stop.exit(step, _checkpoints_dir(job) / checkpoint_name(step), _continue_flag(job),
                                 trainer.is_world_process_zero())
    if not trainer.is_world_process_zero():
        return {}
    trainer.model.generation_config = model_generation
    best_dir = save_model(trainer.model, Path(job.output_dir) / "best", tokenizer)
    summary = _summary(job, trainer, result, int(tokens), throughput.seconds, start_step, resume, best_dir)
    summary.wall_seconds = round(time.perf_counter() - wall_start, 3)
    summary.write(job.output_dir)
    plot_losses(job.output_dir)
    _print_summary(summary, Path(job.output_dir), _checkpoints_dir(job))
    return summary.to_dict()


def _checkpoints_dir(job: Seq2SeqJob) -> Path:
    return Path(job.checkpoints_dir) if job.checkpoints_dir else Path(job.output_dir) / "checkpoints"


def _continue_flag(job: Seq2SeqJob) -> str:
    return "--is_keep_training True" if job.stage == "pretrain" else "--resume_from_checkpoint last"


def _start(job: Seq2SeqJob) -> str | None:
    """The checkpoint to resume, or a fresh start that never mixes with an earlier run's files."""
    resume = begin_run(Path(job.output_dir), _checkpoints_dir(job), job.resume_from_checkpoint,
                       job.overwrite_output_dir, _continue_flag(job), OWN_OUTPUTS)
    return str(resume) if resume else None


def _load(job: Seq2SeqJob):
    """(model, tokenizer, tokenised train set, tokenised eval set or None); everything a user
    can get wrong in the data is checked before the model is built or loaded."""
    from transformers import set_seed

    train_ds = load_pair_dataset(job.train_file, "train")
    eval_ds = load_pair_dataset(job.eval_file, "eval") if job.eval_file else None
    if eval_ds is not None and job.eval_max_samples > 0:
        eval_ds = eval_ds.select(range(min(job.eval_max_samples, len(eval_ds))))
    tokenizer = load_tokenizer(job.tokenizer_dir)
    set_seed(job.seed)  # the fresh model's initial weights depend on it
    if job.init_model_dir:
        model = load_model(job.init_model_dir, config_file=job.model_config_file or None)
        check_vocab(tokenizer, model.config, job.init_model_dir)
    else:
        model = build_model(job.model_config_file)
        check_vocab(tokenizer, model.config, job.model_config_file)
    fill_special_token_ids(model, tokenizer)
    model.set_attn_implementation(job.attn_implementation)
    train_ds = tokenize_pairs(train_ds, tokenizer, job.max_seq_len, "train")
    if eval_ds is not None:
        eval_ds = tokenize_pairs(eval_ds, tokenizer, job.max_seq_len, "eval")
    return model, tokenizer, train_ds, eval_ds


def _training_args(job: Seq2SeqJob, model, has_eval: bool):
    from transformers import Seq2SeqTrainingArguments

    precision = resolve_precision(job.mixed_precision, training_device())
    if precision.note:
        print(precision.note)
    # Eval answers: greedy, as the project's default decoding; max_length rather than
    # max_new_tokens, which the Trainer would combine with the default max_length (20).
    eval_generation = model.generation_config_for("greedy", job.max_seq_len)
    eval_generation.max_new_tokens = None
    eval_generation.max_length = job.max_seq_len + 1  # + the decoder start token
    return Seq2SeqTrainingArguments(
        output_dir=str(_checkpoints_dir(job)),
        per_device_train_batch_size=job.batch_size, per_device_eval_batch_size=job.batch_size,
        gradient_accumulation_steps=job.gradient_accumulation_steps,
        learning_rate=job.learning_rate, warmup_steps=job.warmup_steps, optim="adamw_torch",  # unless _adafactor replaces it
        max_grad_norm=1.0, num_train_epochs=job.num_train_epochs, max_steps=job.max_steps,
        logging_steps=job.logging_steps, logging_first_step=job.logging_first_step,
        save_strategy="steps", save_steps=job.save_steps, save_total_limit=job.save_total_limit or None,
        eval_strategy="steps" if has_eval else "no", eval_steps=job.save_steps if has_eval else None,
        load_best_model_at_end=has_eval, metric_for_best_model="eval_loss", greater_is_better=False,
        predict_with_generate=has_eval,
        generation_config=eval_generation,
        train_sampling_strategy="group_by_length" if job.group_by_length else "random",
        seed=job.seed, report_to="none", dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), torch_compile=job.torch_compile,
        torch_compile_backend=job.torch_compile_backend if job.torch_compile else None, **precision.trainer_flags())


def _make_trainer(job: Seq2SeqJob, model, tokenizer, train_ds, eval_ds):
    """(the Trainer, its ThroughputCallback, its StopOnSignal callback)."""
    from transformers import DataCollatorForSeq2Seq
    from transformers.integrations import TensorBoardCallback

    from .seq2seq_trainer import CountingSeq2SeqTrainer
    from .trainer_callbacks import RunLogCallback, ThroughputCallback

    has_eval = eval_ds is not None
    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(Path(job.output_dir) / "runs")
    throughput, stop_on_signal = ThroughputCallback(), StopOnSignal()
    trainer = CountingSeq2SeqTrainer(
        model=model, args=_training_args(job, model, has_eval), train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=_bleu_metric(tokenizer) if has_eval else None,
        callbacks=[tensorboard, throughput, stop_on_signal, RunLogCallback(job.output_dir, eval_extra=("bleu4",))],
        per_sample_loss=job.per_sample_loss, optimizer_cls_and_kwargs=_adafactor(job))
    return trainer, throughput, stop_on_signal


def _summary(job: Seq2SeqJob, trainer, result, tokens: int, seconds: float, start_step: int, resume: str | None,
             best_dir: Path) -> RunSummary:
    state, args, out = trainer.state, trainer.args, Path(job.output_dir)
    has_eval = trainer.eval_dataset is not None
    best_entry = next((h for h in state.log_history if "eval_loss" in h and h.get("step") == state.best_global_step),
                      {})
    return RunSummary(
        stage=job.stage, trainer="Seq2SeqTrainer", steps=state.global_step,
        steps_this_run=state.global_step - start_step, train_tokens=tokens, train_seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else None,
        final_train_loss=last_value(out / TRAIN_CSV, "loss"), eval_loss=state.best_metric if has_eval else None,
        last_eval_loss=last_value(out / EVAL_CSV, "valid_loss"), eval_bleu4=best_entry.get("eval_bleu4"),
        model_dir=str(best_dir), resumed_from=resume, world_size=args.world_size, device=str(args.device),
        precision=resolve_precision(job.mixed_precision, args.device).label, wall_seconds=None,
        details={"mean_train_loss_this_run": result.training_loss, "best_checkpoint": state.best_model_checkpoint,
                 "parameters": count_parameters(trainer.model), "batch_size": job.batch_size,
                 "gradient_accumulation_steps": job.gradient_accumulation_steps, "job": asdict(job)})


def _fmt(x, spec=".4f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _print_summary(s: RunSummary, out: Path, checkpoints: Path) -> None:
    which = "best eval loss" if s.eval_loss is not None else "last step"
    print(f"\n{s.stage} done: {s.steps} steps ({s.steps_this_run} this run), "
          f"{s.train_tokens:,} non-padding tokens in {s.train_seconds:.1f} s of training "
          f"= {_fmt(s.tokens_per_s, ',.0f')} tokens/s ({s.device}, {s.precision})")
    print(f"  final train loss {_fmt(s.final_train_loss)}, eval loss {_fmt(s.eval_loss)}"
          f", BLEU-4 {_fmt(s.eval_bleu4)}")
    print(f"  model ({which}) -> {s.model_dir}")
    print(f"  checkpoints -> {checkpoints}, tensorboard -> {out / 'runs'}, loss log -> {out / TRAIN_CSV}, "
          f"summary -> {out / SUMMARY_FILE}")
    print(f"  total wall time {s.wall_seconds:.1f} s")
