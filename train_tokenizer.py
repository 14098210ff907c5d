"""Train the tokenizer: HF tokenizers BPE (char or byte level) or sentencepiece BPE.

    python train_tokenizer.py --corpus_file data/demo/corpus.txt --vocab_size 8192 \
        --token_type char --library hf --output_dir model_save/tokenizer

The corpus is a UTF-8 text file, one document or sentence per line, streamed from disk
(`python -m utils.raw_data_process to_text` writes one from a parquet dataset). Training
stays within `--max_memory_mb` (the whole process's RSS; default 8192, for a 16 GB machine):
a corpus that needs more is sampled uniformly down to what fits (see model/tokenizer.py).
"""
import os
from dataclasses import dataclass

from config import PROJECT_ROOT
from model.tokenizer import DEFAULT_MAX_MEMORY_MB
from utils.cli import parse_config, run_cli


@dataclass
class TokenizerTrainConfig:
    corpus_file: str = str(PROJECT_ROOT / "data" / "corpus.txt")
    vocab_size: int = 40960
    token_type: str = "char"  # char | byte
    library: str = "hf"  # hf | sentencepiece
    output_dir: str = str(PROJECT_ROOT / "model_save" / "tokenizer")
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB  # peak RSS of the whole training, in MB


def main() -> None:
    # Training is this process's only tokenizers work: let it count on every core (the
    # quickstart pipeline sets "false" for all stages, meant for the training stages' forks).
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from model.chat_model import check_replaceable
    from model.common import require_writable
    from model.tokenizer import save_tokenizer, train_tokenizer

    _, cfg = parse_config(TokenizerTrainConfig, description=__doc__)
    check_replaceable(cfg.output_dir, "tokenizer")  # before training: no user directory or model is replaced
    require_writable(cfg.output_dir, "--output_dir", is_dir=True)
    tokenizer = train_tokenizer(cfg.corpus_file, cfg.vocab_size, cfg.token_type, cfg.library,
                                max_memory_mb=cfg.max_memory_mb)
    out = save_tokenizer(tokenizer, cfg.output_dir)
    print(f"saved {cfg.library} {cfg.token_type}-level tokenizer with {len(tokenizer)} tokens to {out}")


if __name__ == "__main__":
    run_cli(main)
