"""C-Eval and CMMLU: read the official release, prompt, score A/B/C/D, tabulate by category.

Shared by eval/c_eval.py and eval/cmmlu.py. The flow:

    bench = BENCHMARKS["ceval"]
    questions = load_questions(bench, data_dir, split)           # one CSV per subject
    prompts = build_prompts(bench, questions, dev, n_shot, fits)  # zero- or few-shot
    predictions = scorer(prompts)                                 # "A".."D" per prompt
    table = category_table(bench, questions, predictions)

Any callable from a list of prompts to a list of letters can be the scorer (the tests use
fakes); `ModelScorer` is the real one: it feeds the prompt to the encoder and takes the
argmax of the decoder's first-step logits over the tokens A, B, C and D (the original's
method), so no text is generated and no answer has to be parsed.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from config import PROJECT_ROOT
from utils.cli import UserError

from .subjects import CEVAL_CATEGORIES, CEVAL_SUBJECTS, CMMLU_CATEGORIES, CMMLU_SUBJECTS, cmmlu_categories

CHOICES = ("A", "B", "C", "D")


@dataclass
class MultipleChoiceConfig:
    """C-Eval / CMMLU evaluation (eval/c_eval.py, eval/cmmlu.py)."""
    data_dir: str = ""  # the unpacked official release (the folder holding dev/ val/ test/)
    model_dir: str = str(PROJECT_ROOT / "model_save" / "sft" / "best")
    split: str = ""  # split to score; default: val for C-Eval, test for CMMLU (the splits with answers)
    n_shot: int = 0  # few-shot examples from dev per question; 0 = zero-shot
    subjects: str = ""  # comma-separated subset of subjects; default: every subject file found
    batch_size: int = 8
    max_seq_len: int = 512  # encoder input budget; few-shot examples are dropped to fit
    output_dir: str = str(PROJECT_ROOT / "model_save" / "eval")


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "" where the split has no answers


@dataclass(frozen=True)
class Benchmark:
    name: str  # used in output file names
    title: str
    default_split: str
    splits: tuple[str, ...]
    subject_names: dict  # subject -> Chinese name
    subject_categories: Callable[[str], tuple[str, ...]]
    categories: tuple[str, ...]  # table order
    header: str  # prompt header, formatted with the subject's Chinese name
    question_prefix: str
    answer_prefix: str
    file_name: Callable[[str, str], str] = field(repr=False)  # (subject, split) -> file name

    def subject_of(self, file_name: str, split: str) -> str | None:
        for subject in self.subject_names:
            if self.file_name(subject, split) == file_name:
                return subject
        return None


CEVAL = Benchmark(
    name="ceval", title="C-Eval", default_split="val", splits=("dev", "val", "test"),
    subject_names={s: zh for s, (zh, _) in CEVAL_SUBJECTS.items()},
    subject_categories=lambda s: (CEVAL_SUBJECTS[s][1],), categories=CEVAL_CATEGORIES,
    # the prompt of C-Eval's own evaluation code
    header="以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n",
    question_prefix="", answer_prefix="答案：",
    file_name=lambda subject, split: f"{subject}_{split}.csv",
)
CMMLU = Benchmark(
    name="cmmlu", title="CMMLU", default_split="test", splits=("dev", "test"),
    subject_names={s: zh for s, (zh, _) in CMMLU_SUBJECTS.items()},
    subject_categories=cmmlu_categories, categories=CMMLU_CATEGORIES,
    # the prompt of CMMLU's own evaluation code
    header="以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n",
    question_prefix="题目：", answer_prefix="答案是：",
    file_name=lambda subject, split: f"{subject}.csv",
)
BENCHMARKS = {"ceval": CEVAL, "cmmlu": CMMLU}


def resolve_data_dir(bench: Benchmark, data_dir: str) -> Path:
    if not data_dir:
        raise UserError(f"--data_dir is required: the unpacked {bench.title} release (with dev/ and "
                        f"{bench.default_split}/ folders)")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"{bench.title} data directory not found: {root}")
    # CMMLU's repository keeps the splits under data/; accept the repository root too.
    if not (root / "dev").is_dir() and (root / "data" / "dev").is_dir():
        root = root / "data"
    return root


def read_subject_file(path: Path, subject: str, need_answers: bool) -> list[Question]:
    """One subject's CSV in either official layout (C-Eval: id,question,A..D,answer[,explanation];
    CMMLU: an unnamed index column, Question,A..D,Answer)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise UserError(f"empty question file: {path}")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("question", "a", "b", "c", "d") + (("answer",) if need_answers else ())
               if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(rows[0])})")
    col = {name: header.index(name) for name in header if name}
    id_col = col.get("id", 0 if header[0] == "" else None)
    out = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path} line {line_no}: {len(row)} fields, expected {len(header)}")
        answer = row[col["answer"]].strip().upper() if "answer" in col else ""
        if need_answers and answer not in CHOICES:
            raise UserError(f"{path} line {line_no}: answer {answer!r} is not one of A, B, C, D")
        out.append(Question(subject=subject,
                            id=row[id_col].strip() if id_col is not None else str(line_no - 2),
                            question=row[col["question"]].strip(),
                            options=tuple(row[col[c.lower()]].strip() for c in CHOICES),
                            answer=answer))
    return out


def load_questions(bench: Benchmark, data_dir: Path, split: str, subjects: Sequence[str] = (),
                   need_answers: bool = True) -> dict[str, list[Question]]:
    """{subject: questions} for every subject file of `split` (or just `subjects`), sorted by subject."""
    if split not in bench.splits:
        raise UserError(f"{bench.title} has no split {split!r} (splits: {', '.join(bench.splits)})")
    if need_answers and split == "test" and bench.name == "ceval":
        raise UserError("the C-Eval test split has no public answers; score --split val")
    split_dir = data_dir / split
    if not split_dir.is_dir():
        raise UserError(f"{bench.title} split folder not found: {split_dir}")
    if subjects:
        unknown = [s for s in subjects if s not in bench.subject_names]
        if unknown:
            raise UserError(f"unknown {bench.title} subject(s): {', '.join(unknown)}")
        files = {s: split_dir / bench.file_name(s, split) for s in subjects}
        for s, f in files.items():
            if not f.is_file():
                raise UserError(f"no {split} file for subject {s}: {f}")
    else:
        files = {}
        for f in sorted(split_dir.glob("*.csv")):
            subject = bench.subject_of(f.name, split)
            if subject is None:
                print(f"warning: skipping {f.name}: not a {bench.title} subject of the {split} split")
                continue
            files[subject] = f
        if not files:
            raise UserError(f"no {bench.title} subject files in {split_dir} (expected e.g. "
                            f"{bench.file_name(next(iter(bench.subject_names)), split)})")
    return {s: read_subject_file(f, s, need_answers) for s, f in sorted(files.items())}


def format_question(bench: Benchmark, q: Question, with_answer: bool) -> str:
    text = bench.question_prefix + q.question + "".join(
        f"\n{c}. {o}" for c, o in zip(CHOICES, q.options)) + "\n" + bench.answer_prefix
    return text + f"{q.answer}\n\n" if with_answer else text


def build_prompts(bench: Benchmark, questions: Sequence[Question], dev: dict[str, list[Question]],
                  n_shot: int, fits: Callable[[str], bool] = lambda text: True) -> list[str]:
    """The prompt of each question: header, up to n_shot dev examples, the question.

    Examples are dropped from the end until `fits(prompt)` holds (or none are left), the
    way CMMLU's own code keeps long few-shot prompts within the model's input length.
    """
    prompts = []
    for q in questions:
        header = bench.header.format(bench.subject_names[q.subject])
        shots = [format_question(bench, d, True) for d in dev.get(q.subject, [])[:max(n_shot, 0)]]
        tail = format_question(bench, q, False)
        while True:
            prompt = header + "".join(shots) + tail
            if not shots or fits(prompt):
                break
            shots.pop()
        prompts.append(prompt)
    return prompts


@dataclass
class CategoryRow:
    category: str
    correct: int
    question_count: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.question_count if self.question_count else 0.0


def category_table(bench: Benchmark, questions: Sequence[Question], predictions: Sequence[str]) -> list[CategoryRow]:
    """Correct / question count / accuracy per category (the benchmark's order), then Overall.

    Counts are over questions (micro), so a category's accuracy weighs its subjects by their
    size; Overall counts each question once even where its subject is in two categories.
    """
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    rows = {c: CategoryRow(c, 0, 0) for c in bench.categories}
    overall = CategoryRow("Overall", 0, 0)
    for q, p in zip(questions, predictions):
        hit = int(p == q.answer)
        for c in bench.subject_categories(q.subject):
            rows[c].correct += hit
            rows[c].question_count += 1
        overall.correct += hit
        overall.question_count += 1
    return [r for r in rows.values() if r.question_count] + [overall]


def table_csv(rows: Sequence[CategoryRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["category", "correct", "question_count", "accuracy"])
    for r in rows:
        writer.writerow([r.category, r.correct, r.question_count, f"{r.accuracy:.4f}"])
    return buf.getvalue()


def predictions_csv(questions: Sequence[Question], predictions: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["subject", "id", "answer", "prediction"])
    for q, p in zip(questions, predictions):
        writer.writerow([q.subject, q.id, q.answer, p])
    return buf.getvalue()


def print_table(title: str, rows: Sequence[CategoryRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in ("category", "correct", "question_count", "accuracy"):
        table.add_column(name, justify="left" if name == "category" else "right")
    for r in rows:
        table.add_row(r.category, str(r.correct), str(r.question_count), f"{r.accuracy:.2%}")
    Console().print(table)


def choice_token_ids(tokenizer) -> list[int]:
    """The token id of each of A, B, C, D; each must be a single token of the vocabulary."""
    ids = []
    for c in CHOICES:
        tok = tokenizer(c, add_special_tokens=False)["input_ids"]
        if len(tok) != 1 or tok[0] == tokenizer.unk_token_id:
            raise UserError(f"the tokenizer has no single token for the answer letter {c!r} "
                            f"(encodes as {tok}); cannot score multiple-choice answers")
        ids.append(tok[0])
    return ids


class ModelScorer:
    """Pick A-D by the decoder's first-step logits of a text-to-text model."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_seq_len: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.choice_ids = choice_token_ids(tokenizer)

    def fits(self, text: str) -> bool:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 <= self.max_seq_len

    def choice_logits(self, prompts: Sequence[str]):
        import torch

        from model.generation import pad_prompts

        from .common import batches

        device = next(self.model.parameters()).device
        start = self.model.config.decoder_start_token_id
        out = []
        with torch.inference_mode():
            for batch in batches(list(prompts), self.batch_size):
                ids = self.tokenizer(list(batch), add_special_tokens=False)["input_ids"]
                # keep the end (the question and "答案："), where truncation must not cut
                ids = [x[-(self.max_seq_len - 1):] + [self.tokenizer.eos_token_id] for x in ids]
                decoder_input_ids = torch.full((len(ids), 1), start, dtype=torch.long, device=device)
                logits = self.model(**pad_prompts(self.tokenizer, ids, device),
                                    decoder_input_ids=decoder_input_ids).logits[:, 0]
                out.append(logits[:, self.choice_ids].float().cpu())
        return torch.cat(out)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        if not prompts:
            return []
        return [CHOICES[i] for i in self.choice_logits(prompts).argmax(dim=-1).tolist()]


def run(bench: Benchmark, cfg: MultipleChoiceConfig, scorer=None) -> list[CategoryRow]:
    """The whole evaluation of one benchmark: load, prompt, score, print and write the table.

    `scorer` defaults to a ModelScorer over cfg.model_dir.
    """
    from model.checkpoint import check_run_dir
    from model.common import atomic_write_text, require_writable

    from .common import load_model_and_tokenizer

    split = cfg.split or bench.default_split
    if cfg.n_shot < 0:
        raise UserError(f"--n_shot must be >= 0, got {cfg.n_shot}")
    if cfg.batch_size < 1 or cfg.max_seq_len < 2:
        raise UserError("--batch_size must be >= 1 and --max_seq_len >= 2")
    require_writable(cfg.output_dir, "--output_dir", is_dir=True)
    check_run_dir(cfg.output_dir, "its result tables")
    data_dir = resolve_data_dir(bench, cfg.data_dir)
    subjects = [s.strip() for s in cfg.subjects.split(",") if s.strip()]
    by_subject = load_questions(bench, data_dir, split, subjects)
    dev = {}
    if cfg.n_shot > 0:
        if split == "dev":
            raise UserError("few-shot examples come from dev; score another split or use --n_shot 0")
        dev = load_questions(bench, data_dir, "dev", list(by_subject))
    if scorer is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model_dir)
        scorer = ModelScorer(model, tokenizer, cfg.batch_size, cfg.max_seq_len)
    fits = getattr(scorer, "fits", lambda text: True)
    questions = [q for qs in by_subject.values() for q in qs]
    predictions = scorer(build_prompts(bench, questions, dev, cfg.n_shot, fits))
    rows = category_table(bench, questions, predictions)
    stem = f"{bench.name}_{split}_{cfg.n_shot}shot"
    print_table(f"{bench.title} {split}, {cfg.n_shot}-shot, {len(by_subject)} subjects", rows)
    out_dir = Path(cfg.output_dir)
    table_file = atomic_write_text(out_dir / f"{stem}.csv", table_csv(rows))
    atomic_write_text(out_dir / f"{stem}_predictions.csv", predictions_csv(questions, predictions))
    print(f"wrote {table_file} and {stem}_predictions.csv")
    return rows
