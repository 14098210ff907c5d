"""Generation speed of each search type (greedy, beam, sampling, contrastive) on the same prompts.

    .venv/bin/python benchmarks/bench_generate.py                                  # tiny config, random weights
    .venv/bin/python benchmarks/bench_generate.py --model_config_file model_config.json --threads 2
    .venv/bin/python benchmarks/bench_generate.py --model_dir model_save/final     # a trained model

Every search type decodes the same prompts (fixed random token ids, one prompt per call,
as a chat user asks) for --max_new_tokens tokens through `my_generate`, the entry point of
the CLI, the API and the evaluation. A randomly initialised model rarely emits [EOS], so
every call generates close to the full length; tokens are counted up to each answer's
[EOS]. Prints tokens/s per search type. `generation_speed` is reused by gpu_check.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generated_tokens(seq, eos_id: int) -> int:
    """Tokens after the start token, up to and including each row's first [EOS]."""
    total = 0
    for row in seq[:, 1:].tolist():
        total += row.index(eos_id) + 1 if eos_id in row else len(row)
    return total


def generation_speed(model, prompts, max_new_tokens: int, search_types, device="cpu", sync=None) -> dict:
    """{search_type: (tokens, seconds)} over `prompts` (a list of 1-D LongTensors), one call each."""
    import torch

    results = {}
    for search_type in search_types:
        torch.manual_seed(0)
        tokens, seconds = 0, 0.0
        for ids in prompts:
            ids = ids[None].to(device)
            mask = torch.ones_like(ids)
            if sync:
                sync()
            t0 = time.perf_counter()
            seq = model.my_generate(ids, mask, max_seq_len=max_new_tokens, search_type=search_type)
            if sync:
                sync()
            seconds += time.perf_counter() - t0
            tokens += generated_tokens(seq.cpu(), model.config.eos_token_id)
        results[search_type] = (tokens, seconds)
    return results


def fixed_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    # ids >= 10: past the special tokens ([PAD], [EOS], ...); ends with [EOS] as the dataset's prompts
    return [torch.cat([torch.randint(10, vocab_size, (length - 1,), generator=g), torch.tensor([1])])
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_config_file", default=str(ROOT / "model_config_tiny.json"))
    ap.add_argument("--model_dir", default="", help="a trained model directory instead of random weights")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt_len", type=int, default=24)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--search_types", default="greedy,beam,sampling,contrastive")
    args = ap.parse_args()
    import torch

    from model.chat_model import build_model, load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model_dir) if args.model_dir else build_model(Path(args.model_config_file).resolve())
    model.eval()
    prompts = fixed_prompts(args.prompts, args.prompt_len, model.config.vocab_size)
    results = generation_speed(model, prompts, args.max_new_tokens, args.search_types.split(","))
    print(f"{args.prompts} prompts of {args.prompt_len} tokens, up to {args.max_new_tokens} new tokens, "
          f"{args.threads} thread(s), model {args.model_dir or Path(args.model_config_file).name}")
    for name, (tokens, seconds) in results.items():
        print(f"{name:>12}: {tokens:5d} tokens in {seconds:7.2f} s = {tokens / seconds:8.1f} tokens/s")


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)  # a UserError (a missing model, say) is one line, not a traceback
