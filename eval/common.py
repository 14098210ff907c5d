"""Helpers shared by the evaluation scripts: loading a model directory, batching, reading results."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch


def load_model_and_tokenizer(model_dir: str | Path):
    """(model in eval mode on the best device, tokenizer): the model's own tokenizer, else model_save/tokenizer."""
    from model.chat_model import check_vocab, load_model, load_tokenizer
    from model.harness import training_device
    from model.tokenizer import tokenizer_dir_for

    tokenizer = load_tokenizer(tokenizer_dir_for(model_dir))
    model = load_model(model_dir)
    check_vocab(tokenizer, model.config, str(model_dir))
    # fp32 everywhere: bf16 on CPU is hundreds of times slower, and the scores compared
    # here (A/B/C/D logits) are close enough that half precision could flip ties.
    return model.to(training_device()).eval(), tokenizer


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def pad_inputs(tokenizer, ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists with the tokenizer's [PAD]; (input_ids, attention_mask)."""
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def read_rows(path: str | Path, columns: Sequence[str], what: str = "file") -> list[dict]:
    """Rows of a parquet file or a JSON-lines file, each with (at least) `columns` as strings.

    Parquet is the project's dataset format; JSON lines is what the evaluation scripts write
    for predictions, so either side of a comparison can be either format.
    """

    from utils.cli import UserError, require_file

    p = require_file(path, what)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise UserError(f"{what} is not a readable parquet file: {p} ({exc})") from None
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise UserError(f"{what} {p} has no column(s) {', '.join(missing)} "
                            f"(columns: {', '.join(table.column_names)})")
        rows = table.select(list(columns)).to_pylist()
    else:
        from utils.parquet_io import iter_json_lines

        rows = []
        for line_no, row in iter_json_lines(p, what):
            if not isinstance(row, dict) or any(c not in row for c in columns):
                raise UserError(f"{what} {p} line {line_no}: expected an object with "
                                f"{', '.join(repr(c) for c in columns)}")
            rows.append(row)
    for i, row in enumerate(rows, start=1):
        for c in columns:
            if row[c] is None:
                row[c] = ""
            elif not isinstance(row[c], str):
                raise UserError(f"{what} {p} row {i}: {c!r} is {type(row[c]).__name__}, expected text")
    if not rows:
        raise UserError(f"{what} has no rows: {p}")
    return rows
