"""The quickstart's report card: model_save/report/report.md, from the files each stage wrote.

Read-only over the stages' own outputs (stats.json of the corpus, train_summary.json and
loss_curve.png of each training stage, written by every trainer in one format:
model/run_summary.py, model/run_log.py; the evaluation JSONs: eval/eval_tasks.py's `lm`
figures and continuations of the pretrained model, its `answers` of the final model to the
chat probes), so the card always shows what the scripts measured; it computes nothing but
presentation.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

from model.run_log import PLOT_FILE
from model.run_summary import SUMMARY_FILE, read_summary


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _stage(name: str, out: Path, report_dir: Path) -> dict:
    """One training stage's row: its train_summary.json (read strictly: a damaged file is a
    one-line error, a missing one a row of n/a) and its loss_curve.png (model/run_log.py)."""
    s = read_summary(out / SUMMARY_FILE) if (out / SUMMARY_FILE).exists() else None
    png = None
    if (out / PLOT_FILE).is_file():
        png = report_dir / f"{name}_loss.png"
        shutil.copyfile(out / PLOT_FILE, png)
    if s is None:
        return {"steps": None, "tokens": None, "tokens_per_s": None, "train_loss": None, "valid_loss": None,
                "png": png}
    return {"steps": s.steps, "tokens": s.train_tokens, "tokens_per_s": s.tokens_per_s,
            "train_loss": s.final_train_loss, "valid_loss": s.eval_loss, "png": png}


def _cell(text) -> str:
    """A table cell: one line, pipes escaped, long text cut (the JSON has it whole), "(nothing)" if empty."""
    text = " ".join(str(text or "").split()).replace("|", "\\|") or "(nothing)"
    return text if len(text) <= 120 else text[:119] + "…"


_OBJECTIVES = {  # config.PRETRAIN_OBJECTIVES, as the card names them
    "continuation": "opening -> continuation pairs (the original's objective)",
    "denoise": "denoising pairs only: a chunk with 15% of its characters masked -> the chunk",
    "mixed": "opening -> continuation pairs (the original's objective) and, in the same file, denoising "
             "pairs: a chunk with 15% of its characters masked -> the chunk",
}


def _pretraining_section(lm: dict, bleu: dict, objective: str) -> list[str]:
    lines = ["## What pretraining learnt", "",
             f"Pretraining pairs (`--pretrain_objective {objective}`): {_OBJECTIVES.get(objective, objective)}.", "",
             "Validation split of the pretraining pairs (held out from training), every row: the "
             "pretrained model's per-token loss on the continuations, teacher-forced as in training, "
             "against the unigram entropy of the same tokens (what a model that knows only how often "
             "each token occurs in this split would score: below it, the model uses context).", "",
             "| what | value |", "| --- | ---: |",
             f"| validation loss (nats/token) | {_fmt(lm.get('valid_loss'))} |",
             f"| validation perplexity | {_fmt(lm.get('perplexity'), 1)} |",
             f"| unigram entropy of the same split (nats/token) | {_fmt(lm.get('unigram_entropy'))} |",
             f"| unigram perplexity | {_fmt(lm.get('unigram_perplexity'), 1)} |",
             f"| rows / tokens scored | {_fmt(lm.get('rows'))} / {_fmt(lm.get('tokens'))} |",
             f"| BLEU-4 of greedy continuations, test split | {_fmt(bleu.get('bleu4'))} "
             f"({_fmt(bleu.get('n_samples'))} rows) |", ""]
    if lm.get("samples"):
        penalty = lm.get("repetition_penalty", 1.0)
        how = (f"Greedy continuations (repetition penalty {penalty:g}: the scores of tokens already generated "
               f"are divided by {penalty:g}; plain greedy search makes a model this small loop on one word)"
               if penalty != 1.0 else "Greedy continuations")
        lines += [f"{how} of the first held-out openings of that split:", "",
                  "| opening | pretrained model's continuation | reference |", "| --- | --- | --- |"]
        lines += [f"| {_cell(x['prompt'])} | {_cell(x['response'])} | {_cell(x['reference'])} |"
                  for x in lm["samples"]]
        lines.append("")
    return lines


def _chat_section(chat: dict) -> list[str]:
    if not chat.get("samples"):
        return []
    lines = ["## The final model's answers", "",
             "Greedy answers of model_save/final (what cli_demo.py and api_demo.py load) to fixed prompts "
             "(data/demo/chat_probes.parquet): four of the kinds its SFT data teaches and one it does not.",
             "", "| prompt | answer | the answer SFT teaches |", "| --- | --- | --- |"]
    lines += [f"| {_cell(x['prompt'])} | {_cell(x['response'])} | {_cell(x['reference'])} |" for x in chat["samples"]]
    return lines + [""]


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "sacrebleu"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


TRAINING_STAGES = (("pretrain (train.py)", "pretrain"), ("SFT (sft_train.py)", "sft"),
                   ("DPO, LoRA (dpo_train.py)", "dpo"))  # (row name, stage and output directory name)


def write_report(workdir: Path, state: dict, small: bool) -> Path:
    from model.common import atomic_write_text
    from utils.embedded_corpus import pretrain_objective_of

    saves, data = workdir / "model_save", workdir / "data" / "demo"
    report_dir = saves / "report"
    ev = report_dir / "eval"
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Report card: the whole pipeline on the embedded corpus", ""]
    if small:
        lines += ["**Cut-down run (`--small`)**: a check that every stage works, not a measurement.", ""]
    lines += _corpus_section(_read_json(data / "stats.json"))
    lines += _training_section(saves, report_dir, state)
    lines += [""] + _pretraining_section(_read_json(ev / "pretrain_lm.json"),
                                         _read_json(saves / "pretrain" / "test_results.json"),
                                         pretrain_objective_of(data))
    lines += _evaluation_section(ev)
    lines += [""] + _chat_section(_read_json(ev / "final_chat.json"))
    lines += _wall_times_section(state)
    lines += ["## Software and machine", "", f"- {_versions()}", f"- {_machine()}", ""]
    return atomic_write_text(report_dir / "report.md", "\n".join(lines))


def _corpus_section(stats: dict) -> list[str]:
    lines = ["## Corpus", "", "| file | rows | characters |", "| --- | ---: | ---: |"]
    for name, info in stats.get("files", stats).items():
        if isinstance(info, dict) and "rows" in info:
            lines.append(f"| {name} | {_fmt(info['rows'])} | {_fmt(info.get('chars'))} |")
    return lines


def _training_section(saves: Path, report_dir: Path, state: dict) -> list[str]:
    lines = ["", "## Training", "",
             "| stage | steps | tokens | tokens/s | final train loss | validation loss of the saved model | wall time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    stages = {name: _stage(stage, saves / stage, report_dir) for name, stage in TRAINING_STAGES}
    for name, stage in TRAINING_STAGES:
        s, wall = stages[name], state.get(stage, {}).get("wall_s")
        lines.append(f"| {name} | {_fmt(s['steps'])} | {_fmt(s['tokens'])} | {_fmt(s['tokens_per_s'], 0)} | "
                     f"{_fmt(s['train_loss'])} | {_fmt(s['valid_loss'])} | {_fmt(wall, 0)} s |")
    lines.append("")
    lines += [f"![{name} loss]({Path(s['png']).name})" for name, s in stages.items() if s["png"]]
    return lines


def _evaluation_section(ev: Path) -> list[str]:
    lines = ["## Evaluation", "", "| what | model | result |", "| --- | --- | --- |"]
    for tag, label in (("sft", "SFT"), ("final", "DPO (merged)")):
        s = _read_json(ev / f"{tag}_sentiment.json")
        lines.append(f"| sentiment accuracy, held-out reviews | {label} | {_fmt(s.get('accuracy'))} "
                     f"(majority baseline {_fmt(s.get('majority_baseline'))}, {_fmt(s.get('rows'))} rows) |")
    for tag, label in (("sft", "SFT"), ("final", "DPO (merged)")):
        e = _read_json(ev / f"{tag}_entity.json")
        lines.append(f"| entity extraction F1 / P / R, held-out sentences | {label} | {_fmt(e.get('f1'))} / "
                     f"{_fmt(e.get('precision'))} / {_fmt(e.get('recall'))} ({_fmt(e.get('rows'))} rows) |")
    for tag, label in (("dpo_before", "SFT (before DPO)"), ("dpo_after", "DPO (merged)")):
        d = _read_json(ev / f"{tag}.json")
        lines.append(f"| preference accuracy (log p(chosen) > log p(rejected)), held-out pairs | {label} | "
                     f"{_fmt(d.get('logp_accuracy'))} (per-token {_fmt(d.get('logp_accuracy_per_token'))}; "
                     f"DPO reward accuracy {_fmt(d.get('reward_accuracy'))}, margin {_fmt(d.get('reward_margin'))}; "
                     f"{_fmt(d.get('pairs'))} pairs) |")
    return lines


def _wall_times_section(state: dict) -> list[str]:
    lines = ["## Stage wall times", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {info['wall_s']:.0f} |" for name, info in state.items()]
    total = sum(info["wall_s"] for info in state.values())
    return lines + [f"| **total** | **{total:.0f}** |", ""]
