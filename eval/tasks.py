"""Tasks of the embedded corpus: sentiment accuracy, entity F1, BLEU-4, language-model figures.

`eval/eval_tasks.py` runs `evaluate_file`: answers are generated greedily in batches (the
prompt plus [EOS] as encoder input, exactly as in training, then `my_generate`), written
as JSON lines (prompt, response = the generated answer, reference), and scored:

- sentiment: accuracy, a response counting as correct only when it is exactly the
  reference label (积极 / 消极) after stripping spaces; the majority-class baseline of the
  same file is reported next to it (a model that always answers the commoner label).
- entity: micro F1 / precision / recall of the (entity, type) pairs (utils.metrics.tuple_prf).
- bleu: corpus BLEU-4 (model.metrics.corpus_bleu4, the implementation training reports).
- lm: what pretraining learnt, on a pretraining split: the per-token loss of the reference
  continuations given their openings (teacher-forced, as in training) over every row, its
  perplexity, and next to it the unigram entropy of the same tokens (the loss of a model
  that knows only how often each token occurs in this very split: a floor for any
  unigram model); greedy continuations are generated for the first --show_rows rows only.
- answers: greedy answers to every prompt, unscored (e.g. chat probes for a report).

Every task keeps the first --show_rows (prompt, answer, reference) triples in its JSON as
`samples`, so a report can show what the model says next to the figures.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from config import PROJECT_ROOT
from utils.cli import UserError

TASKS = ("sentiment", "entity", "bleu", "lm", "answers")
SENTIMENT_LABELS = ("积极", "消极")


@dataclass
class EvalTasksConfig:
    """Generation-task evaluation (eval/eval_tasks.py)."""
    model_dir: str = str(PROJECT_ROOT / "model_save" / "sft" / "best")
    test_file: str = ""  # parquet (or JSON lines) with prompt and response columns
    task: str = ""  # sentiment | entity | bleu | lm | answers
    max_rows: int = -1  # > 0: only the first max_rows rows
    batch_size: int = 16
    max_seq_len: int = 256  # prompt tokens, [EOS] included; longer prompts are cut at the end
    max_new_tokens: int = 128  # generated tokens per answer at most
    output_json: str = ""  # default: model_save/eval/<task>_<test file name>.json
    predictions_file: str = ""  # default: the output_json path with _predictions.jsonl
    show_rows: int = 5  # (prompt, answer, reference) of the first rows kept in the JSON as `samples`
    # > 1: greedy search with the scores of tokens already generated divided by this (Keskar et
    # al. 2019); the quickstart's `lm` continuations use 1.3: a 2M-parameter model's plain greedy
    # continuation loops on one word (the report card says which was used)
    repetition_penalty: float = 1.0


def sentiment_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    refs = [r.strip() for r in references]
    correct = sum(p.strip() == r for p, r in zip(predictions, refs))
    label, count = Counter(refs).most_common(1)[0]
    return {"accuracy": correct / len(refs), "correct": correct, "rows": len(refs),
            "unparseable": sum(p.strip() not in SENTIMENT_LABELS for p in predictions),
            "majority_label": label, "majority_baseline": count / len(refs)}


def score(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict:
    from model.metrics import corpus_bleu4
    from utils.metrics import tuple_prf

    if task == "sentiment":
        return sentiment_scores(predictions, references)
    if task == "entity":
        return tuple_prf(predictions, references, arity=2)
    if task == "bleu":
        return {"bleu4": corpus_bleu4(predictions, references), "rows": len(references)}
    raise UserError(f"unknown --task {task!r}; expected one of: {', '.join(TASKS)}")


def lm_figures(model, tokenizer, prompts: Sequence[str], references: Sequence[str], batch_size: int,
               max_seq_len: int) -> dict:
    """Teacher-forced per-token loss of `references` given `prompts`, and the unigram entropy
    of the same reference tokens ([EOS] included on both sides, as the training loss counts it)."""
    import math

    import torch

    from model.dataset import Collator, encode_batch

    from .common import batches

    device = next(model.parameters()).device
    enc = encode_batch(tokenizer, prompts, references, max_seq_len)
    rows = [{"input_ids": a, "labels": b} for a, b in zip(enc["input_ids"], enc["labels"])]
    collate = Collator(tokenizer.pad_token_id)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in batches(rows, batch_size):
            b = collate(chunk)
            labels = b["labels"].to(device)
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                           labels=labels).logits
            nll += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                     ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
    counts = Counter(t for ids in enc["labels"] for t in ids)
    unigram = -sum(c / tokens * math.log(c / tokens) for c in counts.values())
    loss = nll / tokens
    return {"valid_loss": loss, "perplexity": math.exp(loss), "unigram_entropy": unigram,
            "unigram_perplexity": math.exp(unigram), "tokens": tokens, "rows": len(rows)}


def generate_answers(model, tokenizer, prompts: Sequence[str], batch_size: int, max_seq_len: int,
                     max_new_tokens: int | None = None, repetition_penalty: float = 1.0) -> list[str]:
    """Greedy answers, batched by similar prompt length (less padding), in input order, stripped;
    says how many prompts --max_seq_len cuts."""
    from model.dataset import encode_texts_cut, report_cuts
    from model.generation import generate_batch

    ids, cut = encode_texts_cut(tokenizer, prompts, max_seq_len)
    report_cuts("test", len(prompts), sum(cut), None, max_seq_len)
    answers = generate_batch(model, tokenizer, ids, max_new_tokens or max_seq_len, batch_size=batch_size,
                             repetition_penalty=repetition_penalty)
    return [text.strip() for text in answers]


def evaluate_file(cfg: EvalTasksConfig) -> dict:
    from model.pairs import read_rows
    from model.common import atomic_write_text, require_distinct, require_writable

    from .common import load_model_and_tokenizer

    if cfg.task not in TASKS:
        raise UserError(f"--task must be one of: {', '.join(TASKS)} (got {cfg.task!r})")
    if not cfg.test_file:
        raise UserError("--test_file is required (parquet with prompt and response columns)")
    if cfg.batch_size < 1 or cfg.max_seq_len < 2 or cfg.max_new_tokens < 1 or cfg.show_rows < 0:
        raise UserError("--batch_size and --max_new_tokens must be >= 1, --max_seq_len >= 2, --show_rows >= 0")
    if not cfg.repetition_penalty >= 1.0:  # also NaN
        raise UserError(f"--repetition_penalty must be >= 1 (1 = plain greedy), got {cfg.repetition_penalty}")
    out_json = Path(cfg.output_json or PROJECT_ROOT / "model_save" / "eval" /
                    f"{cfg.task}_{Path(cfg.test_file).stem}.json")
    pred_file = Path(cfg.predictions_file or out_json.with_name(out_json.stem + "_predictions.jsonl"))
    require_distinct([("--output_json", out_json), ("--predictions_file", pred_file)], [("--test_file", cfg.test_file)])
    require_writable(out_json, "--output_json")  # before the generation, not after it
    require_writable(pred_file, "--predictions_file")
    rows = read_rows(cfg.test_file, ("prompt", "response"), "test file")
    if cfg.max_rows > 0:
        rows = rows[:cfg.max_rows]
    model, tokenizer = load_model_and_tokenizer(cfg.model_dir)
    prompts = [r["prompt"] for r in rows]
    references = [r["response"] for r in rows]
    if cfg.task == "lm":  # figures over every row; continuations of the shown rows only
        figures = lm_figures(model, tokenizer, prompts, references, cfg.batch_size, cfg.max_seq_len)
        prompts, references = prompts[:cfg.show_rows], references[:cfg.show_rows]
    predictions = generate_answers(model, tokenizer, prompts, cfg.batch_size, cfg.max_seq_len, cfg.max_new_tokens,
                                   cfg.repetition_penalty)
    if cfg.task == "answers":
        figures = {"rows": len(rows)}
    elif cfg.task != "lm":
        figures = score(cfg.task, predictions, references)
    samples = [{"prompt": p, "response": g, "reference": r}
               for p, g, r in list(zip(prompts, predictions, references))[:cfg.show_rows]]
    metrics = {"task": cfg.task, "test_file": str(cfg.test_file), "model_dir": str(cfg.model_dir),
               **figures, "repetition_penalty": cfg.repetition_penalty, "samples": samples}
    atomic_write_text(pred_file, "".join(
        json.dumps({"prompt": p, "response": g, "reference": r}, ensure_ascii=False) + "\n"
        for p, g, r in zip(prompts, predictions, references)))
    atomic_write_text(out_json, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    print(json.dumps(metrics, ensure_ascii=False, indent=2))
    print(f"wrote {out_json} and {pred_file}")
    return metrics
