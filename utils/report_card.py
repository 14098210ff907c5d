"""The quickstart's report card: model_save/report/report.md, from the files each stage wrote.

Read-only over the stages' own outputs (stats.json of the corpus, train_summary.json and
loss logs of each training stage, the evaluation JSONs: eval/eval_tasks.py's `lm` figures
and continuations of the pretrained model, its `answers` of the final model to the chat
probes), so the card always shows what the scripts measured; it computes nothing but
presentation.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
from pathlib import Path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _first(d: dict, *keys):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _log_history(output_dir: Path) -> list[dict]:
    """The Trainer's log history from the newest checkpoint under <output_dir>/checkpoints."""
    states = sorted(output_dir.glob("checkpoints/*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    return _read_json(states[-1]).get("log_history", []) if states else []


def _plot(png: Path, curves: dict[str, tuple[list, list]], ylabel: str = "loss") -> Path | None:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", label=label, linewidth=1, markersize=3)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return png


def _train_py_stage(out: Path, report_dir: Path) -> dict:
    """train.py: train_summary.json + train_loss.csv + eval.csv + loss_curve.png."""
    s = _read_json(out / "train_summary.json")

    def rows(name):
        p = out / name
        if not p.is_file():
            return []
        with open(p, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    losses, evals = rows("train_loss.csv"), rows("eval.csv")
    png = None
    if (out / "loss_curve.png").is_file():
        png = report_dir / "pretrain_loss.png"
        shutil.copyfile(out / "loss_curve.png", png)
    return {"steps": s.get("global_step"), "tokens": s.get("non_padding_tokens"),
            "tokens_per_s": s.get("tokens_per_s"),
            "train_loss": float(losses[-1]["loss"]) if losses else None,
            "valid_loss": float(evals[-1]["valid_loss"]) if evals else None, "png": png}


def _trainer_stage(name: str, out: Path, report_dir: Path, eval_key: str = "eval_loss") -> dict:
    """sft_train.py / dpo_train.py: train_summary.json + the Trainer's log history."""
    s = _read_json(out / "train_summary.json")
    hist = _log_history(out)
    train = ([h["step"] for h in hist if "loss" in h], [h["loss"] for h in hist if "loss" in h])
    valid = ([h["step"] for h in hist if eval_key in h], [h[eval_key] for h in hist if eval_key in h])
    png = _plot(report_dir / f"{name}_loss.png", {"train loss": train, "validation loss": valid})
    last_log = s.get("last_log") or {}
    return {"steps": _first(s, "steps", "global_step"), "tokens": _first(s, "train_tokens", "non_padding_tokens"),
            "tokens_per_s": _first(s, "tokens_per_sec", "tokens_per_s"),
            "train_loss": _first(s, "final_train_loss") or last_log.get("loss") or (train[1][-1] if train[1] else None),
            "valid_loss": _first(s, "final_eval_loss", "last_eval_loss") or (valid[1][-1] if valid[1] else None),
            "png": png}


def _cell(text) -> str:
    """A table cell: one line, pipes escaped, long text cut (the JSON has it whole), "(nothing)" if empty."""
    text = " ".join(str(text or "").split()).replace("|", "\\|") or "(nothing)"
    return text if len(text) <= 120 else text[:119] + "…"


def _pretraining_section(lm: dict, bleu: dict) -> list[str]:
    lines = ["## What pretraining learnt", "",
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
        lines += ["Greedy continuations of the first held-out openings of that split:", "",
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


def write_report(workdir: Path, state: dict, small: bool) -> Path:
    saves, data = workdir / "model_save", workdir / "data" / "demo"
    report_dir = saves / "report"
    ev = report_dir / "eval"
    report_dir.mkdir(parents=True, exist_ok=True)
    stats = _read_json(data / "stats.json")
    stages = {"pretrain (train.py)": _train_py_stage(saves / "pretrain", report_dir),
              "SFT (sft_train.py)": _trainer_stage("sft", saves / "sft", report_dir),
              "DPO, LoRA (dpo_train.py)": _trainer_stage("dpo", saves / "dpo", report_dir)}
    bleu = _read_json(saves / "pretrain" / "test_results.json")
    ev_json = {name: _read_json(ev / f"{name}.json") for name in
               ("sft_sentiment", "sft_entity", "final_sentiment", "final_entity", "dpo_before", "dpo_after",
                "pretrain_lm", "final_chat")}

    lines = ["# Report card: the whole pipeline on the embedded corpus", ""]
    if small:
        lines += ["**Cut-down run (`--small`)**: a check that every stage works, not a measurement.", ""]
    lines += ["## Corpus", "", "| file | rows | characters |", "| --- | ---: | ---: |"]
    files = stats.get("files", stats)
    for name, info in files.items():
        if isinstance(info, dict) and "rows" in info:
            lines.append(f"| {name} | {_fmt(info['rows'])} | {_fmt(info.get('chars'))} |")
    lines += ["", "## Training", "",
              "| stage | steps | tokens | tokens/s | final train loss | final validation loss | wall time |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    walls = {"pretrain (train.py)": "pretrain", "SFT (sft_train.py)": "sft", "DPO, LoRA (dpo_train.py)": "dpo"}
    for name, s in stages.items():
        wall = state.get(walls[name], {}).get("wall_s")
        lines.append(f"| {name} | {_fmt(s['steps'])} | {_fmt(s['tokens'])} | {_fmt(s['tokens_per_s'], 0)} | "
                     f"{_fmt(s['train_loss'])} | {_fmt(s['valid_loss'])} | {_fmt(wall, 0)} s |")
    lines.append("")
    for name, s in stages.items():
        if s["png"]:
            lines.append(f"![{name} loss]({Path(s['png']).name})")
    lines += [""] + _pretraining_section(ev_json["pretrain_lm"], bleu)
    lines += ["## Evaluation", "", "| what | model | result |", "| --- | --- | --- |"]
    for tag, label in (("sft", "SFT"), ("final", "DPO (merged)")):
        s = ev_json[f"{tag}_sentiment"]
        lines.append(f"| sentiment accuracy, held-out reviews | {label} | {_fmt(s.get('accuracy'))} "
                     f"(majority baseline {_fmt(s.get('majority_baseline'))}, {_fmt(s.get('rows'))} rows) |")
    for tag, label in (("sft", "SFT"), ("final", "DPO (merged)")):
        e = ev_json[f"{tag}_entity"]
        lines.append(f"| entity extraction F1 / P / R, held-out sentences | {label} | {_fmt(e.get('f1'))} / "
                     f"{_fmt(e.get('precision'))} / {_fmt(e.get('recall'))} ({_fmt(e.get('rows'))} rows) |")
    for tag, label in (("dpo_before", "SFT (before DPO)"), ("dpo_after", "DPO (merged)")):
        d = ev_json[tag]
        lines.append(f"| preference accuracy (log p(chosen) > log p(rejected)), held-out pairs | {label} | "
                     f"{_fmt(d.get('logp_accuracy'))} (per-token {_fmt(d.get('logp_accuracy_per_token'))}; "
                     f"DPO reward accuracy {_fmt(d.get('reward_accuracy'))}, margin {_fmt(d.get('reward_margin'))}; "
                     f"{_fmt(d.get('pairs'))} pairs) |")
    lines += [""] + _chat_section(ev_json["final_chat"])
    lines += ["## Stage wall times", "", "| stage | seconds |", "| --- | ---: |"]
    total = 0.0
    for name, info in state.items():
        lines.append(f"| {name} | {info['wall_s']:.0f} |")
        total += info["wall_s"]
    lines += [f"| **total** | **{total:.0f}** |", "", "## Software and machine", "",
              f"- {_versions()}", f"- {_machine()}", ""]
    from utils.parquet_io import atomic_write_text

    return atomic_write_text(report_dir / "report.md", "\n".join(lines))
