"""Answers to a list of prompts, generated the one way every stage does: encode, pad, generate, decode.

    from model.generation import generate_batch
    answers = generate_batch(model, tokenizer, ["感冒了要怎么办"], max_new_tokens=64, max_prompt_len=320)

Used by training's BLEU evaluation (model/trainer.py `evaluate`), eval/tasks.py, the DPO
preference data (utils/dpo_data_process.py) and `ChatBot.chat` (model/infer.py). The chat
bot's batched, streamed answers (`ChatBot._generate_batch`) call `generate` themselves, with a
streamer, stopping criteria and sampling settings for each row, but encode, pad and decode
with the helpers here:

- `encode_prompts`: each prompt's tokens plus [EOS], exactly as in training
  (model.dataset.encode_texts), cut to `max_prompt_len` tokens;
- `pad_prompts`: the encoder input, padded on the right with [PAD] as the training Collator
  pads it, with its attention mask, on the model's device;
- `decode_answers`: the generated ids as text, special tokens dropped.
"""
from __future__ import annotations

from typing import Sequence

import torch

from model.dataset import encode_texts

Prompts = Sequence[str] | Sequence[Sequence[int]]  # texts, or token ids from encode_prompts


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_len: int) -> list[list[int]]:
    """Token ids of each prompt plus [EOS], at most `max_prompt_len` of them (the prompt is cut at its end)."""
    return encode_texts(tokenizer, prompts, max_prompt_len)


def pad_prompts(tokenizer, ids: Sequence[Sequence[int]], device) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of encoded prompts, right-padded to the longest, on `device`."""
    batch = tokenizer.pad({"input_ids": [list(x) for x in ids]}, padding=True, padding_side="right",
                          return_attention_mask=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def decode_answers(tokenizer, ids) -> list[str]:
    """Each row of generated ids as text (special tokens, padding included, dropped)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu()
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _as_ids(tokenizer, prompts: Prompts, max_prompt_len: int | None) -> list[list[int]]:
    if not prompts or not isinstance(prompts[0], str):
        return [list(x) for x in prompts]
    if max_prompt_len is None:
        raise ValueError("max_prompt_len is needed to encode text prompts")
    return encode_prompts(tokenizer, prompts, max_prompt_len)


def generate_ids(model, tokenizer, prompts: Prompts, max_new_tokens: int, max_prompt_len: int | None = None,
                 search_type: str = "greedy", streamer=None, repetition_penalty: float = 1.0) -> torch.LongTensor:
    """The decoder ids `my_generate` returns for `prompts`, generated as one batch."""
    inputs = pad_prompts(tokenizer, _as_ids(tokenizer, prompts, max_prompt_len), model.device)
    return model.my_generate(inputs["input_ids"], inputs["attention_mask"], max_seq_len=max_new_tokens,
                             search_type=search_type, streamer=streamer, repetition_penalty=repetition_penalty)


def generate_batch(model, tokenizer, prompts: Prompts, max_new_tokens: int, max_prompt_len: int | None = None,
                   search_type: str = "greedy", batch_size: int | None = None,
                   repetition_penalty: float = 1.0) -> list[str]:
    """The answers to `prompts` (texts, or ids already encoded), in their order.

    With `batch_size`, the prompts are generated in batches of that many, grouped by length
    (less padding); without it, as one batch in the order given (a caller that seeds each
    batch, or batches for its own reasons, keeps that batch).
    """
    ids = _as_ids(tokenizer, prompts, max_prompt_len)
    if not ids:
        return []
    if not batch_size:
        return decode_answers(tokenizer, generate_ids(model, tokenizer, ids, max_new_tokens, search_type=search_type,
                                                      repetition_penalty=repetition_penalty))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        out = generate_ids(model, tokenizer, [ids[i] for i in chunk], max_new_tokens, search_type=search_type,
                           repetition_penalty=repetition_penalty)
        for i, text in zip(chunk, decode_answers(tokenizer, out)):
            answers[i] = text
    return answers
