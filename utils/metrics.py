"""Tuple-extraction metrics of the eval scripts and the info-extraction example: parsing
model output (`parse_tuples`) and micro F1 (`tuple_prf`).

BLEU-4, which training reports too, is model/metrics.py's `corpus_bleu4`.
"""
from __future__ import annotations

import re
from typing import Sequence


# --- Tuple extraction (triples, entities): parsing model output and micro F1 ----------------
#
# Responses are written as `[(a,b,c),(a,b,c)]` (the original's triple-extraction format; the
# embedded corpus's entity task uses pairs `[(江泽民,人名),(北京,地名)]`). Generated text is
# often malformed, so the parser is tolerant: it normalises full-width brackets and commas,
# takes every parenthesised group it can find and keeps those that are well formed.
# No library parses this ad-hoc format, hence the hand-written regex.

_FULLWIDTH = str.maketrans({"（": "(", "）": ")", "，": ","})
_GROUP = re.compile(r"\(([^()]*)\)")
_QUOTES = "'\"“”‘’「」 \t\r\n"


def format_tuples(tuples: Sequence[Sequence[str]]) -> str:
    """`[(a,b),(c,d)]`: the response text a model is trained to produce."""
    return "[" + ",".join("(" + ",".join(str(x) for x in t) + ")" for t in tuples) + "]"


def parse_tuples(text: str, arity: int | None = None) -> list[tuple[str, ...]]:
    """The well-formed tuples in `text`, in order, duplicates kept.

    A tuple is well formed when it has `arity` fields (any number >= 2 when arity is None)
    and no field is empty after stripping spaces and quotes. Everything else (unbalanced
    brackets, stray text, a truncated last tuple) is ignored, never an error.
    """
    if not isinstance(text, str):
        return []
    out = []
    for group in _GROUP.findall(text.translate(_FULLWIDTH)):
        fields = tuple(f.strip(_QUOTES) for f in group.split(","))
        if arity is None and len(fields) < 2 or arity is not None and len(fields) != arity:
            continue
        if all(fields):
            out.append(fields)
    return out


def tuple_prf(predictions: Sequence[str], references: Sequence[str], arity: int | None = None) -> dict:
    """Micro precision, recall and F1 of predicted against reference tuple lists.

    Each row's tuples are compared as sets (a tuple repeated in one answer counts once);
    true positives, predicted and reference counts are summed over rows before dividing.
    With nothing predicted precision is 0 (1 if the references are empty too); with no
    reference tuples recall is 1 if nothing was predicted, else 0.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    tp = n_pred = n_gold = 0
    for pred, gold in zip(predictions, references):
        p, g = set(parse_tuples(pred, arity)), set(parse_tuples(gold, arity))
        tp += len(p & g)
        n_pred += len(p)
        n_gold += len(g)
    precision = tp / n_pred if n_pred else float(n_gold == 0)
    recall = tp / n_gold if n_gold else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "true_positives": tp,
            "predicted": n_pred, "reference": n_gold, "rows": len(references)}
