r"""Preference data for DPO: prompt / chosen / rejected pairs, written as JSON and parquet.

    python -m utils.dpo_data_process --instruction_file data/alpaca_gpt4_data_zh.json \
        --sft_model_dir model_save/sft/best \
        [--preference_files data/raw/huozi_rlhf_data.json,data/raw/train-00000.parquet] \
        [--max_rows 2000] [--batch_size 32] [--max_new_tokens 320]

As in the original project, the chosen answer comes from an instruction dataset and the
rejected answer is what the SFT model itself says to the same prompt (greedy decoding by
default), so DPO pushes the model from its own habits towards the reference answers.

Inputs
- `--instruction_file`: a parquet file of `prompt`/`response`, or JSON / JSON lines of
  alpaca-gpt4-data-zh records (`instruction`, `input`, `output`; the prompt is
  "instruction\ninput" when input is not empty, model.pairs.join_prompt, as in SFT data) or
  of `prompt`/`response`.
- `--preference_files`: ready-made pairs merged in, JSON / JSON lines / parquet with
  `prompt`, `chosen` and `rejected` (rlhf-reward-single-round-trans_chinese) or `reject`
  (huozi_rlhf_data_json, as the original reads it).

Generation is resumable: every finished batch is appended (and flushed to disk) to a
partial file next to the output; a rerun with the same inputs and settings continues after
the last finished batch, and the outputs are the same as an uninterrupted run's. The final
files are written atomically and only then is the partial file removed. No output may be an
input, and the .parquet copy beside a JSON output replaces only a .parquet copy this command
wrote (marked in its metadata): a user's file of that name is an error, before any work.

Pairs are dropped, and counted by reason, when the prompt or the chosen answer is empty,
a text is longer than `--max_len` characters, or the rejected answer equals the chosen one.
An empty rejected answer is kept: a model that says nothing gave a real, dispreferred answer
(an undertrained SFT model often does). A malformed record (bad
JSON, not an object, a missing / null / non-string field) is reported with its file and
position and skipped; a run that ends with no pair at all is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Callable, Iterable

if not __package__ and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a file, from utils/ as the original does or as `python utils/dpo_data_process.py`: the project,
    # not utils/, goes first on the path (the project's packages were not found: a traceback).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from model.common import require_distinct
from model.pairs import PAIR_FIELDS, Report, preference_problem, read_instruction_file, read_preference_file
from utils.cli import UserError, parse_config, require_writable, run_cli


# --------------------------------------------------------------------------- filtering

def drop_reason(row: dict, max_len: int) -> str | None:
    """Why a pair is dropped, or None. Also asked of an instruction row (prompt and chosen
    answer) before its rejected answer is generated, with the reasons that apply already."""
    problem = preference_problem({"rejected": "", **row})
    if problem:
        return problem
    if max(len(row[k]) for k in PAIR_FIELDS if k in row) > max_len:
        return f"longer than {max_len} characters"
    return None


def filter_pairs(rows: Iterable[dict], max_len: int, report: Report) -> list[dict]:
    """Drop empty, over-long, rejected == chosen and exactly repeated pairs (counted by reason)."""
    out, seen = [], set()
    for row in rows:
        reason = drop_reason(row, max_len)
        if reason:
            report.drop(reason)
        else:
            key = (row["prompt"], row["chosen"], row["rejected"])
            if key in seen:
                report.drop("duplicate pair")
                continue
            seen.add(key)
            out.append({k: row[k] for k in PAIR_FIELDS})
    return out


# --------------------------------------------------------------------------- generation

class PartialLog:
    """Append-only record of generated answers, so an interrupted generation resumes.

    Line 1 is {"fingerprint": ...} (inputs and settings); then one {"i": n, "rejected": s}
    per prompt, in order, written a batch at a time and fsync'ed. A line torn by a kill is
    cut off on reopening; a fingerprint from other inputs or settings is refused (or the
    file restarted with `restart`), so answers never get attached to the wrong prompts.
    """

    HEADER = b'{"fingerprint"'

    def __init__(self, path: Path, fingerprint: dict, restart: bool = False) -> None:
        self.path = path
        self.answers: list[str] = []
        if path.exists():
            with open(path, "rb") as fh:
                head = fh.read(len(self.HEADER))
            if not self.HEADER.startswith(head):  # ours start so (or are empty, or torn in it by a kill)
                raise UserError(f"--partial_file {path} is not a generation log of this command (it does not start "
                                "with its header): refusing to overwrite it; choose another --partial_file or move it")
        if path.exists() and not restart:
            self._load(fingerprint)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"fingerprint": fingerprint}, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def _load(self, fingerprint: dict) -> None:
        good_bytes = 0
        with open(self.path, "rb") as fh:
            for n, raw in enumerate(fh):
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("torn line")
                    rec = json.loads(raw)
                except ValueError:
                    break
                if n == 0:
                    if rec.get("fingerprint") != fingerprint:
                        raise UserError(
                            f"{self.path} holds answers generated from other inputs or settings; "
                            "delete it or pass --restart True to generate again")
                elif rec.get("i") == len(self.answers) and isinstance(rec.get("rejected"), str):
                    self.answers.append(rec["rejected"])
                else:
                    break
                good_bytes += len(raw)
        if good_bytes == 0:  # not even the header survived: start over
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"fingerprint": fingerprint}, ensure_ascii=False) + "\n")
            return
        with open(self.path, "r+b") as fh:
            fh.truncate(good_bytes)

    def append(self, answers: list[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            for text in answers:
                fh.write(json.dumps({"i": len(self.answers), "rejected": text}, ensure_ascii=False) + "\n")
                self.answers.append(text)
            fh.flush()
            os.fsync(fh.fileno())


def generate_answers(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                     max_seq_len: int, search_type: str, seed: int) -> list[str]:
    """The model's answers to a batch of prompts (prompt + [EOS] in, as in training), as one batch."""
    import torch

    from model.generation import generate_batch

    torch.manual_seed(seed)  # sampling search types: the same batch gives the same answers on a rerun
    return generate_batch(model, tokenizer, prompts, max_new_tokens, max_prompt_len=max_seq_len,
                          search_type=search_type)


def _model_fingerprint(model_dir: Path) -> dict:
    weights = [p for p in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))]
    return {"dir": str(model_dir.resolve()),
            "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]}


def generate_rejected(rows: list[dict], cfg, report: Report,
                      generate: Callable[..., list[str]] = generate_answers) -> list[dict]:
    """Attach the SFT model's answer as `rejected` to each {'prompt', 'chosen'} row."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from model.chat_model import load_model_and_tokenizer
    from model.tokenizer import tokenizer_dir_for

    model_dir = Path(cfg.sft_model_dir)
    if not model_dir.is_dir():
        raise UserError(f"SFT model directory not found: {model_dir} (train one with sft_train.py)")
    prompts = [r["prompt"] for r in rows]
    fingerprint = {
        "prompts_sha256": hashlib.sha256("\x00".join(prompts).encode("utf-8")).hexdigest(),
        "n_prompts": len(prompts), "model": _model_fingerprint(model_dir),
        "search_type": cfg.search_type, "max_new_tokens": cfg.max_new_tokens,
        "max_seq_len": cfg.max_seq_len, "batch_size": cfg.batch_size, "seed": cfg.seed,
    }
    fingerprint = json.loads(json.dumps(fingerprint))  # compared with its JSON copy on resume
    log = PartialLog(partial_path(cfg), fingerprint, restart=cfg.restart)
    report.resumed_from = len(log.answers)
    if len(log.answers) < len(prompts):
        if report.resumed_from:
            print(f"resuming generation after {report.resumed_from} of {len(prompts)} prompts ({log.path})")
        import torch

        from model.harness import resolve_device

        device = resolve_device(cfg.device)
        model, tokenizer = load_model_and_tokenizer(model_dir, tokenizer_dir_for(model_dir))
        model = model.to(device).eval()
        columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns) as bar, torch.inference_mode():
            task = bar.add_task("generating rejected answers", total=len(prompts), completed=len(log.answers))
            while len(log.answers) < len(prompts):
                # batches start at multiples of batch_size, so a resumed run batches (and
                # seeds) exactly like an uninterrupted one
                start = len(log.answers) - len(log.answers) % cfg.batch_size
                batch = prompts[start:start + cfg.batch_size]
                answers = generate(model, tokenizer, batch, cfg.batch_size, cfg.max_new_tokens,
                                   cfg.max_seq_len, cfg.search_type, cfg.seed + start)
                log.append(answers[len(log.answers) - start:])
                bar.update(task, completed=len(log.answers))
    report.generated = len(prompts) - report.resumed_from
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": a} for r, a in zip(rows, log.answers)]


def partial_path(cfg) -> Path:
    return Path(cfg.partial_file) if cfg.partial_file else Path(f"{cfg.train_file}.rejected.partial.jsonl")


# --------------------------------------------------------------------------- output

def split_pairs(rows: list[dict], eval_ratio: float, eval_rows: int, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then (train, eval); eval gets at least one pair when asked for any."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if eval_rows > 0:
        n_eval = eval_rows
    elif eval_ratio > 0:
        n_eval = max(1, round(len(rows) * eval_ratio))
    else:
        n_eval = 0
    n_eval = min(n_eval, len(rows) - 1)  # training keeps at least one pair
    return rows[n_eval:], rows[:n_eval]


def write_json_atomic(rows: list[dict], path: Path) -> None:
    from model.common import atomic_write_text

    atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1))


PARQUET_MARKER = {b"written_by": b"ChatLM-mini-Chinese utils.dpo_data_process"}  # in the schema metadata


def write_parquet_atomic(rows: list[dict], path: Path) -> None:
    """prompt/chosen/rejected parquet (the pair writer of utils.parquet_io has two columns),
    marked as this command's so that a rerun may replace it (check_outputs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model.common import temp_path

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array([r[k] for r in rows], type=pa.string()) for k in PAIR_FIELDS},
                     metadata=PARQUET_MARKER)
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _replaceable_copy(copy: Path, named: Path) -> bool:
    """Whether `copy` is this command's .parquet copy of `named`: marked so in its metadata, or
    (written before the marker) holding exactly the pairs of `named`, so replacing it loses nothing."""
    import pyarrow.parquet as pq

    try:
        if all((pq.read_schema(copy).metadata or {}).get(k) == v for k, v in PARQUET_MARKER.items()):
            return True
        return named.is_file() and pq.read_table(copy, columns=list(PAIR_FIELDS)).to_pylist() == json.loads(
            named.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 (not parquet, other columns, unreadable JSON: not a copy either way)
        return False


def check_outputs(cfg, extra: list[str]) -> None:
    """Before anything is read: no output is an input (or the other output), and the .parquet
    copies (named by the JSON outputs, not by the user) replace only files this command wrote."""
    outputs = [("--train_file", Path(cfg.train_file)), ("--eval_file", Path(cfg.eval_file))]
    copies = [(f"the .parquet copy of {flag}", path.with_suffix(".parquet")) for flag, path in outputs]
    require_distinct(outputs + (copies if cfg.write_parquet else []) + [("--partial_file", partial_path(cfg))],
                     [("--instruction_file", cfg.instruction_file), *[("--preference_files", p) for p in extra]])
    for (flag, named), (_, copy) in zip(outputs, copies):
        if cfg.write_parquet and (copy.exists() or copy.is_symlink()) and not (
                copy.is_file() and _replaceable_copy(copy, named)):
            raise UserError(f"the .parquet copy of {flag} would replace {copy}, which this project did not write: "
                            f"move it away, choose another {flag}, or --write_parquet False")


# --------------------------------------------------------------------------- the command

def build(cfg, generate: Callable[..., list[str]] = generate_answers) -> Report:
    """Read, generate, merge, filter, split and write; returns what happened."""
    report = Report()
    train_path, eval_path = Path(cfg.train_file), Path(cfg.eval_file)
    if train_path.suffix.lower() != ".json" or eval_path.suffix.lower() != ".json":
        raise UserError("--train_file and --eval_file must end in .json (a .parquet copy is written beside them)")
    extra = [p.strip() for p in cfg.preference_files.split(",") if p.strip()]
    if not cfg.instruction_file and not extra:
        raise UserError("nothing to read: give --instruction_file and/or --preference_files")
    check_outputs(cfg, extra)
    for flag, path in (("--train_file", train_path), ("--eval_file", eval_path)):
        require_writable(path, flag)
    from model.checkpoint import lock_output_dir

    lock_output_dir(train_path, "--train_file")  # two runs on one output would append to one partial file
    # read (and validate) every input before the slow generation starts
    instruction_rows = read_instruction_file(cfg.instruction_file, report, cfg.max_rows) if cfg.instruction_file else []
    extra_rows = [row for p in extra
                  for row in read_preference_file(p, report, cfg.max_rows, unescape=cfg.unescape_newlines)]
    report.malformed.warn()
    pairs = []
    if instruction_rows:
        # prompts or chosen answers that would be dropped anyway are not worth generating for
        keep = []
        for row in instruction_rows:
            reason = drop_reason(row, cfg.max_len)
            if reason:
                report.drop(reason)
            else:
                keep.append(row)
        if keep:
            pairs.extend(generate_rejected(keep, cfg, report, generate))
    pairs.extend(extra_rows)
    pairs = filter_pairs(pairs, cfg.max_len, report)
    if not pairs:
        print_counts(report)
        raise UserError("no preference pairs left after filtering (counts above); nothing written")
    train, held_out = split_pairs(pairs, cfg.eval_ratio, cfg.eval_rows, cfg.seed)
    write_json_atomic(train, train_path)
    write_json_atomic(held_out, eval_path)
    if cfg.write_parquet:
        write_parquet_atomic(train, train_path.with_suffix(".parquet"))
        write_parquet_atomic(held_out, eval_path.with_suffix(".parquet"))
    partial_path(cfg).unlink(missing_ok=True)  # only once the outputs are safely in place
    report.train_rows, report.eval_rows = len(train), len(held_out)
    return report


def print_counts(report: Report) -> None:
    for path, n in report.read.items():
        print(f"read {n} records from {path}")
    if report.malformed.count:
        print(f"malformed records skipped: {report.malformed.count}")
    if report.generated or report.resumed_from:
        print(f"rejected answers generated: {report.generated} (resumed after {report.resumed_from})")
    for reason, n in sorted(report.dropped.items()):
        print(f"dropped ({reason}): {n}")


def print_report(report: Report, cfg) -> None:
    print_counts(report)
    print(f"wrote {report.train_rows} training pairs to {cfg.train_file}")
    print(f"wrote {report.eval_rows} held-out pairs to {cfg.eval_file}")


def main(argv=None) -> None:
    from config import DpoDataConfig

    _, cfg = parse_config(DpoDataConfig, argv, description=__doc__)
    report = build(cfg)
    print_report(report, cfg)


if __name__ == "__main__":
    run_cli(main)
