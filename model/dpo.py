"""The DPO stage: train (full or LoRA), merge a LoRA adapter, evaluate preferences.

Run through the root script (`python dpo_train.py --help` lists every setting):

    python dpo_train.py train [--use_lora True] [--max_steps N] ...   # writes <output_dir>/best
    python dpo_train.py merge                                          # adapter -> full model dir
    python dpo_train.py eval --model model_save/dpo/best               # preference accuracy / margin

Outputs: full DPO writes a model directory (model.chat_model.save_model) at
`<output_dir>/best`; LoRA writes the peft adapter (adapter_config.json,
adapter_model.safetensors, plus the tokenizer) there instead, and `merge` folds it into the
SFT model and writes a full model directory to `merged_output_dir`. Checkpoints (resumable
with `--resume_from_checkpoint last`) go under `<output_dir>/checkpoints/`; the loss and
reward log to `<output_dir>/train_loss.csv` and `eval.csv`, plotted to `loss_curve.png`
(model/run_log.py); the run summary to `train_summary.json` (model/run_summary.py). Ctrl+C or SIGTERM stops after the current step with a
checkpoint saved, as in every stage (model/harness.py).
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from model.common import UserError, require_distinct

from .chat_model import check_replaceable, check_vocab, load_model, load_tokenizer, save_model
from .checkpoint import check_run_dir
from .dpo_trainer import (METRIC_NAMES, PreferenceCollator, Seq2SeqDPOTrainer, disable_dropout, encode_pairs,
                          preference_metrics, score_pairs)
from .harness import StopOnSignal, resolve_precision, training_device
from .run_log import EVAL_CSV, PLOT_FILE, TRAIN_CSV, last_value, plot_losses
from .run_summary import SUMMARY_FILE, RunSummary
from .tokenizer import tokenizer_dir_for
from .trainer_callbacks import RunLogCallback, ThroughputCallback

ADAPTER_CONFIG = "adapter_config.json"
# what `train` writes under <output_dir> besides checkpoints: --overwrite_output_dir removes these
OWN_OUTPUTS = ("best", TRAIN_CSV, EVAL_CSV, PLOT_FILE, SUMMARY_FILE)
CONTINUE_FLAG = "--resume_from_checkpoint last"


def _require_sft(cfg) -> None:
    if not Path(cfg.sft_model_file).exists():
        raise UserError(f"SFT model not found: {cfg.sft_model_file} (train one with sft_train.py, "
                        "or pass --sft_model_file)")


def _dataset(rows: list[dict], tokenizer, max_seq_len: int):
    from datasets import Dataset

    from .dataset import report_dataset_cuts

    ds = Dataset.from_list(rows)
    ds = ds.map(lambda b: encode_pairs(tokenizer, b["prompt"], b["chosen"], b["rejected"], max_seq_len),
                batched=True, remove_columns=ds.column_names, desc="tokenising pairs")
    return report_dataset_cuts(ds, "preference", max_seq_len)


def lora_config(cfg):
    from peft import LoraConfig, TaskType

    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]  # not empty: config.py
    # bias "none": T5 has no bias terms (the original's bias="all" changes nothing), and a
    # trained bias would survive disable_adapter() and spoil the reference
    return LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=cfg.lora_r,
                      lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none")


@contextmanager
def _peft_wrapping():
    """peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model,
    a FutureWarning in every LoRA train and merge log that no setting of ours can answer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter_model(adapter_dir: str | Path, base_model_dir: str | Path, trainable: bool = False):
    """The SFT model with a saved LoRA adapter applied (a peft model)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise UserError(f"not a LoRA adapter directory (no {ADAPTER_CONFIG}): {adapter_dir}")
    base = load_model(base_model_dir)
    try:
        recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, OSError):
        raise UserError(f"unreadable {ADAPTER_CONFIG} in {adapter_dir}") from None
    if recorded and Path(recorded).exists() and Path(recorded).resolve() != Path(base_model_dir).resolve():
        print(f"warning: the adapter was trained on {recorded}, applying it to {base_model_dir}")
    with _peft_wrapping():
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def _read_pairs(cfg) -> tuple[list[dict], list[dict] | None]:
    """(training pairs, evaluation pairs or None when there is no eval file)."""
    from model.pairs import load_preference_pairs

    train_rows = load_preference_pairs(cfg.dpo_train_file, what="DPO training file")
    if cfg.dpo_eval_file and Path(cfg.dpo_eval_file).is_file():
        return train_rows, load_preference_pairs(cfg.dpo_eval_file, cfg.max_eval_pairs, what="DPO eval file")
    if cfg.dpo_eval_file:
        print(f"note: no eval file at {cfg.dpo_eval_file}; training without evaluation")
    return train_rows, None


def _policy_and_reference(cfg, tokenizer):
    """(the policy: the SFT model, with a fresh LoRA adapter under --use_lora; the frozen
    reference: a second copy of the SFT model, or None under LoRA, where the Trainer takes the
    policy with its adapter disabled as the reference)."""
    from transformers import set_seed

    # Seeded before the model is built, as pre_train/sft do: LoRA's A matrices are drawn here,
    # and the Trainer seeds only when it is made (after), so they came from whatever state the
    # generator was left in (the same data and --seed gave a different adapter).
    set_seed(cfg.seed)
    policy = load_model(cfg.sft_model_file)
    check_vocab(tokenizer, policy.config, cfg.sft_model_file)
    policy.set_attn_implementation(cfg.attn_implementation)
    if cfg.disable_dropout:
        disable_dropout(policy)
    if cfg.use_lora:
        from peft import get_peft_model

        with _peft_wrapping():
            policy = get_peft_model(policy, lora_config(cfg))
        policy.print_trainable_parameters()
        return policy, None
    ref_model = load_model(cfg.sft_model_file)
    ref_model.set_attn_implementation(cfg.attn_implementation)
    return policy, ref_model


def _training_args(cfg, checkpoints: Path, has_eval: bool, precision):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        optim=cfg.optim,
        logging_first_step=cfg.logging_first_step,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.save_steps if has_eval else None,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        remove_unused_columns=False,  # the collator needs chosen_labels / rejected_labels
        report_to=[] if cfg.report_to in ("", "none") else [cfg.report_to],
        seed=cfg.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        torch_compile=cfg.torch_compile,
        torch_compile_backend=cfg.torch_compile_backend if cfg.torch_compile else None,
        **precision.trainer_flags(),
    )


def train(cfg) -> Path:
    """DPO from the SFT model; returns the written <output_dir>/best."""
    import time

    from .checkpoint import begin_run, checkpoint_name, read_state

    wall_start = time.perf_counter()
    out = Path(cfg.output_dir)
    train_rows, eval_rows = _read_pairs(cfg)
    _require_sft(cfg)
    checkpoints = out / "checkpoints"
    resume = begin_run(out, checkpoints, cfg.resume_from_checkpoint, cfg.overwrite_output_dir, CONTINUE_FLAG,
                       OWN_OUTPUTS)
    tokenizer = load_tokenizer(tokenizer_dir_for(cfg.sft_model_file, cfg))
    policy, ref_model = _policy_and_reference(cfg, tokenizer)
    has_eval = bool(eval_rows)
    precision = resolve_precision(cfg.mixed_precision, training_device())
    if precision.note:
        print(precision.note)
    args = _training_args(cfg, checkpoints, has_eval, precision)
    stop_on_signal = StopOnSignal()
    throughput = ThroughputCallback()
    trainer = Seq2SeqDPOTrainer(
        model=policy, ref_model=ref_model, beta=cfg.beta, args=args,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        train_dataset=_dataset(train_rows, tokenizer, cfg.max_seq_len),
        eval_dataset=_dataset(eval_rows, tokenizer, cfg.max_seq_len) if has_eval else None,
        data_collator=PreferenceCollator(tokenizer.pad_token_id),
        callbacks=[RunLogCallback(out, train_extra=(*METRIC_NAMES, "grad_norm"), eval_extra=METRIC_NAMES),
                   throughput, stop_on_signal],
    )
    start_step = read_state(resume)["global_step"] if resume else 0
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop_on_signal.requested:
        step = trainer.state.global_step
        stop_on_signal.stop.exit(step, checkpoints / checkpoint_name(step), CONTINUE_FLAG,
                                 trainer.is_world_process_zero())
    best = out / "best"
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokens = int(trainer.accelerator.reduce(torch.as_tensor(trainer.trained_tokens, device=args.device),
                                            reduction="sum"))
    if trainer.is_world_process_zero():
        # a peft model's save_pretrained writes just the adapter; save_model makes it atomic
        save_model(model, best, tokenizer)
        state, seconds = trainer.state, throughput.seconds
        RunSummary(
            stage="dpo", trainer="DPO", steps=state.global_step, steps_this_run=state.global_step - start_step,
            train_tokens=tokens, train_seconds=round(seconds, 3),
            tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else None,
            final_train_loss=last_value(out / TRAIN_CSV, "loss"), eval_loss=state.best_metric if has_eval else None,
            last_eval_loss=last_value(out / EVAL_CSV, "valid_loss"), eval_bleu4=None, model_dir=str(best),
            resumed_from=resume, world_size=args.world_size, device=str(args.device),
            precision=precision.label,
            wall_seconds=round(time.perf_counter() - wall_start, 3),
            details={"use_lora": cfg.use_lora, "mean_train_loss_this_run": result.training_loss,
                     "best_checkpoint": state.best_model_checkpoint, "trainer_metrics": result.metrics},
        ).write(out)
        plot_losses(out)
        print(f"saved {'LoRA adapter' if cfg.use_lora else 'DPO model'} to {best}")
    return best


def merge(cfg) -> Path:
    """Fold the LoRA adapter into the SFT model; write a full model dir to merged_output_dir."""
    adapter_dir = Path(cfg.adapter_dir) if cfg.adapter_dir else Path(cfg.output_dir) / "best"
    if not is_adapter_dir(adapter_dir):
        raise UserError(f"not a LoRA adapter directory (no {ADAPTER_CONFIG}): {adapter_dir}")
    _require_sft(cfg)
    # before the merge: neither a user's directory nor a tokenizer is ever replaced
    check_replaceable(cfg.merged_output_dir, "model")
    model = load_adapter_model(adapter_dir, cfg.sft_model_file)
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(tokenizer_dir_for(
        adapter_dir if (adapter_dir / "tokenizer.json").is_file() else cfg.sft_model_file, cfg))
    check_vocab(tokenizer, merged.config, cfg.sft_model_file)
    out = save_model(merged, cfg.merged_output_dir, tokenizer)
    print(f"merged {adapter_dir} into {cfg.sft_model_file}; wrote {out}")
    return out


def evaluate(cfg) -> dict:
    """Preference accuracy and reward margin of a policy against the SFT reference."""
    from model.pairs import load_preference_pairs

    policy_path = Path(cfg.model) if cfg.model else Path(cfg.output_dir) / "best"
    if not policy_path.exists():  # the subject of the command: checked before its tokenizer, data or reference
        raise UserError(f"policy model not found: {policy_path} (--model: a model directory or a LoRA adapter "
                        f"directory; default <output_dir>/best)")
    if not cfg.dpo_eval_file:
        raise UserError("--dpo_eval_file is required for eval")
    out = Path(cfg.eval_output_file) if cfg.eval_output_file else Path(cfg.output_dir) / "preference_eval.json"
    if not cfg.eval_output_file:
        check_run_dir(cfg.output_dir, "preference_eval.json")
    require_distinct([("--eval_output_file", out)], [("--dpo_eval_file", cfg.dpo_eval_file)])
    rows = load_preference_pairs(cfg.dpo_eval_file, cfg.max_eval_pairs, what="DPO eval file")
    _require_sft(cfg)
    device = training_device()  # fp32: the models are not cast
    tokenizer = load_tokenizer(tokenizer_dir_for(cfg.sft_model_file, cfg))
    if is_adapter_dir(policy_path):
        policy, reference = load_adapter_model(policy_path, cfg.sft_model_file).to(device).eval(), None
    else:
        policy = load_model(policy_path).to(device).eval()
        if policy_path.resolve() == Path(cfg.sft_model_file).resolve():
            reference = policy
        else:
            reference = load_model(cfg.sft_model_file).to(device).eval()
            check_vocab(tokenizer, reference.config, cfg.sft_model_file)
    check_vocab(tokenizer, policy.config, str(policy_path))
    scores = score_pairs(policy, tokenizer, rows, cfg.max_seq_len, cfg.eval_batch_size, reference, device)
    metrics = {"policy": str(policy_path), "reference": str(cfg.sft_model_file), "eval_file": str(cfg.dpo_eval_file),
               **preference_metrics(scores, cfg.beta)}
    _write_json(metrics, out)
    print_metrics(metrics)
    print(f"wrote {out}")
    return metrics


def print_metrics(m: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DPO preferences on {m['pairs']} pairs of {Path(m['eval_file']).name} (beta {m['beta']})")
    table.add_column("metric")
    table.add_column("policy", justify="right")
    table.add_column("reference (SFT)", justify="right")
    table.add_row("implicit-reward accuracy", f"{m['reward_accuracy']:.3f}", "0.000 (by definition)")
    table.add_row("mean reward margin", f"{m['reward_margin']:.4f}", "0")
    table.add_row("log-prob accuracy (summed)", f"{m['policy_logp_accuracy']:.3f}",
                  f"{m['reference_logp_accuracy']:.3f}")
    table.add_row("log-prob accuracy (per token)", f"{m['policy_logp_accuracy_per_token']:.3f}",
                  f"{m['reference_logp_accuracy_per_token']:.3f}")
    Console().print(table)


def _write_json(obj: dict, path: Path) -> None:
    from model.common import atomic_write_text

    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str))
