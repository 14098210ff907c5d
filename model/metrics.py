"""BLEU-4 of generated answers, the one implementation that training, `train.py test` and
the eval scripts (eval/tasks.py) report.

BLEU-4 is sacrebleu's corpus BLEU with character-level tokenisation (Chinese has no
spaces; characters are the unit the original's BLEU used), reported on a 0-1 scale.
It is computed once over the whole evaluation set, never averaged over batches.
The tuple-extraction metrics of the eval scripts are in utils/metrics.py.
"""
from __future__ import annotations

from typing import Sequence


def corpus_bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1] of `hypotheses` against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("BLEU of an empty evaluation set")
    bleu = sacrebleu.metrics.BLEU(tokenize="char", max_ngram_order=4, effective_order=True)
    return bleu.corpus_score(list(hypotheses), [list(references)]).score / 100.0
