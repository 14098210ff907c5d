"""model/generation.py: the one encode -> pad -> generate -> decode, and the four callers that use it
(training's BLEU evaluation, eval/tasks.py, DPO preference data, the chat bot) agreeing on the text."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from config import InferConfig
from eval.common import load_model_and_tokenizer
from model.generation import encode_prompts, generate_batch, pad_prompts

MAX_NEW, MAX_PROMPT = 7, 12
PROMPTS = ["你好", "感冒了要怎么办", "今天天气怎么样，我想出去走走，可以吗？还是在家里看书比较好", "再见",
           "江泽民在北京会见了来自上海的代表团"]


def _trainer_hypotheses(model, tokenizer, path, monkeypatch) -> list[str]:
    """The greedy answers training's evaluation scores with BLEU, in row order."""
    from accelerate import Accelerator

    from model import metrics
    from model.dataset import Collator, TokenizedPairs
    from model.trainer import evaluate

    seen = []
    bleu = metrics.corpus_bleu4
    monkeypatch.setattr(metrics, "corpus_bleu4", lambda hyps, refs: seen.append(list(hyps)) or bleu(hyps, refs))
    data = TokenizedPairs(path, tokenizer, MAX_PROMPT, keep_texts=True)
    evaluate(Accelerator(cpu=True), model, tokenizer, data, Collator(tokenizer.pad_token_id), 2, MAX_NEW)
    return seen[0]


def test_every_caller_generates_the_same_text(chatty_model_dir, tmp_path, monkeypatch):
    from eval.tasks import generate_answers as eval_answers
    from model.infer import FALLBACK_ANSWER, ChatBot
    from utils.dpo_data_process import generate_answers as dpo_answers

    model, tokenizer = load_model_and_tokenizer(chatty_model_dir)
    expected = generate_batch(model, tokenizer, PROMPTS, MAX_NEW, max_prompt_len=MAX_PROMPT)
    assert len(set(expected)) > 2  # real, prompt-dependent text
    assert generate_batch(model, tokenizer, PROMPTS, MAX_NEW, max_prompt_len=MAX_PROMPT, batch_size=2) == expected

    assert eval_answers(model, tokenizer, PROMPTS, 2, MAX_PROMPT, MAX_NEW) == [t.strip() for t in expected]
    assert dpo_answers(model, tokenizer, PROMPTS, len(PROMPTS), MAX_NEW, MAX_PROMPT, "greedy", 0) == expected
    path = tmp_path / "valid.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "response": ["好的"] * len(PROMPTS)}), path)
    assert _trainer_hypotheses(model, tokenizer, path, monkeypatch) == expected

    bot = ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=MAX_NEW, max_prompt_tokens=MAX_PROMPT))
    shown = [t if t.strip() else FALLBACK_ANSWER for t in expected]
    assert bot.chat(PROMPTS) == shown
    assert [bot.answer(p).text for p in PROMPTS] == shown  # the batched serving path
    assert ["".join(bot.stream_chat(p)) for p in PROMPTS] == shown


def test_prompts_are_encoded_and_padded_like_training(tiny_model_dir):
    from model.dataset import Collator, encode_batch

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    ids = encode_prompts(tokenizer, PROMPTS, MAX_PROMPT)
    assert all(x[-1] == tokenizer.eos_token_id and len(x) <= MAX_PROMPT for x in ids)
    assert max(len(x) for x in ids) == MAX_PROMPT  # the long prompt is cut at its end, [EOS] kept
    padded = pad_prompts(tokenizer, ids, "cpu")
    enc = encode_batch(tokenizer, PROMPTS, PROMPTS, MAX_PROMPT)
    collated = Collator(tokenizer.pad_token_id)([{"input_ids": a, "labels": b}
                                                 for a, b in zip(enc["input_ids"], enc["labels"])])
    assert torch.equal(padded["input_ids"], collated["input_ids"])
    assert torch.equal(padded["attention_mask"], collated["attention_mask"])
    # token ids already encoded give what the texts give
    assert generate_batch(model, tokenizer, ids, MAX_NEW) == generate_batch(model, tokenizer, PROMPTS, MAX_NEW,
                                                                            max_prompt_len=MAX_PROMPT)
    assert generate_batch(model, tokenizer, [], MAX_NEW) == []
    with pytest.raises(ValueError, match="max_prompt_len"):
        generate_batch(model, tokenizer, PROMPTS, MAX_NEW)
