"""Helpers shared by the evaluation scripts: loading a model directory and batching.

Their test and prediction files are read by model.pairs.read_rows (the one reader of pair files)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence


def load_model_and_tokenizer(model_dir: str | Path):
    """(model in eval mode on the best device, tokenizer): the model's own tokenizer, else model_save/tokenizer."""
    from model.chat_model import load_model_and_tokenizer
    from model.harness import training_device
    from model.tokenizer import tokenizer_dir_for

    model, tokenizer = load_model_and_tokenizer(model_dir, tokenizer_dir_for(model_dir))
    # fp32 everywhere: bf16 on CPU is hundreds of times slower, and the scores compared
    # here (A/B/C/D logits) are close enough that half precision could flip ties.
    return model.to(training_device()).eval(), tokenizer


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


