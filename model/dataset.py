"""Text-to-text data: parquet files of `prompt`/`response` pairs, tokenised for the model.

The parquet format is the original project's: exactly two string columns, no [EOS] in the
text; the end-of-sequence token is appended here, to prompt and response alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from utils.cli import UserError

REQUIRED_COLUMNS = ("prompt", "response")


def check_parquet(path: str | Path, what: str = "dataset") -> Path:
    """A parquet file that exists, has string `prompt` and `response` columns and rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {p}")
    try:
        meta = pq.ParquetFile(p)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise UserError(f"{what} file is not a readable parquet file: {p} ({exc})") from None
    schema = meta.schema_arrow
    for col in REQUIRED_COLUMNS:
        if col not in schema.names:
            raise UserError(f"{what} file {p} has no '{col}' column (columns: {', '.join(schema.names)})")
        if not (pa.types.is_string(schema.field(col).type) or pa.types.is_large_string(schema.field(col).type)):
            raise UserError(f"{what} file {p}: column '{col}' is {schema.field(col).type}, expected string")
    if meta.metadata.num_rows == 0:
        raise UserError(f"{what} file has no rows: {p}")
    return p


def encode_texts(tokenizer, texts: Sequence[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of each text, truncated so that with the appended [EOS] it fits max_seq_len."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    return [x[: max_seq_len - 1] + [eos] for x in ids]


def encode_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_seq_len: int) -> dict:
    """{'input_ids': [...], 'labels': [...]}, unpadded, for a batch of pairs."""
    return {"input_ids": encode_texts(tokenizer, prompts, max_seq_len),
            "labels": encode_texts(tokenizer, responses, max_seq_len)}
