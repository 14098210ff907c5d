"""ChatBot: a trained chat model ready to answer, for the CLI (cli_demo.py) and the API (api_demo.py).

    from config import InferConfig
    from model.infer import ChatBot

    bot = ChatBot(InferConfig(model_dir="model_save/final"))
    print(bot.chat("感冒了要怎么办"))             # whole answer (any search type)
    for piece in bot.stream_chat("感冒了要怎么办"):  # pieces of the answer as they are generated
        print(piece, end="", flush=True)

The model is a model directory, a `.safetensors` file or a legacy `.bin` state dict
(`model.chat_model.load_model` reads all three); left at its default, `model_dir` is
model_save/final, else the model directory at model_save/ itself (where the original's
README puts the published model): `find_model`. Its tokenizer is the one in the model's
directory unless `tokenizer_dir` says otherwise. It runs on CUDA, MPS or the CPU, in half
precision on a GPU and fp32 on the CPU. A question gets [EOS] appended exactly as in
training (`model.dataset.encode_texts`).

One generation runs at a time (a lock around the model): callers in several threads (the
API's worker threads, a streaming thread) queue on it instead of interleaving on one device.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

import torch
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from config import MODEL_SAVE_DIR, InferConfig
from model.chat_model import SEARCH_TYPES, check_vocab, is_model_dir, load_model, load_tokenizer
from model.dataset import encode_texts
from model.tokenizer import tokenizer_dir_for
from model.common import UserError, is_given

# The original project's answer when the model generates nothing printable.
FALLBACK_ANSWER = "我是一个参数很少的AI模型🥺，知识库较少，无法直接回答您的问题，换个问题试试吧👋"


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device {name!r} (expected auto, cpu, cuda, cuda:N or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"device {name!r} requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, mixed_precision: str = "bf16") -> torch.dtype:
    """Half precision on a GPU, fp32 on the CPU (where bf16 is hundreds of times slower)."""
    if mixed_precision not in ("bf16", "fp16", "no"):
        raise UserError(f"mixed_precision must be bf16, fp16 or no, got {mixed_precision!r}")
    if device.type == "cpu" or mixed_precision == "no":
        return torch.float32
    if device.type == "cuda" and mixed_precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16  # T5 overflows less in bf16 than in fp16
    return torch.float16


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (the model ended it), "length" (hit max_new_tokens) or "cancelled"


class GenerationControl(StoppingCriteria):
    """Lets another thread stop a running generation, and counts its steps.

    `generate` asks every stopping criterion after each new token, so setting `stop` ends
    the generation within one decoding step (a client that went away stops costing compute).
    """

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.steps = 0

    def stop(self) -> None:
        self.stop_event.set()

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        return torch.full((input_ids.shape[0],), self.stop_event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class AnswerStream:
    """One streamed answer: iterate (or `async for`) over its text pieces as they are generated.

    Generation runs in its own thread. When it produced no printable text the stream yields
    FALLBACK_ANSWER instead; an error in the generation thread is raised to the reader.
    `stop()` ends the generation early; `answer` holds the totals once the stream is done.
    """

    def __init__(self, bot: "ChatBot", prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                 asynchronous: bool) -> None:
        self.control = GenerationControl()
        self.answer: Answer | None = None
        self.error: BaseException | None = None
        self._bot = bot
        self._pieces: list[str] = []
        cls = AsyncTextIteratorStreamer if asynchronous else TextIteratorStreamer
        self.streamer = cls(bot.tokenizer, skip_prompt=True, skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)
        self._thread = threading.Thread(target=self._run, args=(prompt, max_new_tokens, temperature, top_p),
                                        name="chatbot-generate", daemon=True)
        self._thread.start()

    def _run(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
        try:
            self.answer = self._bot._generate_one(prompt, max_new_tokens, temperature, top_p,
                                                  self.control, self.streamer)
        except BaseException as exc:  # handed to the reader; the thread itself must not die silently
            self.error = exc
            self.streamer.end()

    def stop(self) -> None:
        self.control.stop()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _tail(self) -> Iterator[str]:
        """What follows the model's pieces: an error, or the fallback for an empty answer."""
        if self.error is not None:
            raise self.error
        if not "".join(self._pieces).strip() and not self.control.stopped:
            if self.answer is not None:
                self.answer.text = FALLBACK_ANSWER
            yield FALLBACK_ANSWER

    def __iter__(self) -> Iterator[str]:
        for piece in self.streamer:
            if piece:
                self._pieces.append(piece)
                yield piece
        self._thread.join()
        yield from self._tail()

    async def __aiter__(self) -> AsyncIterator[str]:
        async for piece in self.streamer:
            if piece:
                self._pieces.append(piece)
                yield piece
        # The streamer ends right before generate returns; wait for the thread without blocking the loop.
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        for piece in self._tail():
            yield piece


def find_model(config: InferConfig) -> Path:
    """The model to chat with: `model_dir` when given; else the default, model_save/final,
    else a model directory at model_save/ itself (where the original's README puts the
    published model)."""
    if is_given(config, "model_dir"):
        path = Path(config.model_dir)
        if not path.exists():
            raise UserError(f"model not found: {path} (train one, or pass --model_dir)")
        return path
    final = MODEL_SAVE_DIR / "final"
    if final.exists():
        return final
    if is_model_dir(MODEL_SAVE_DIR):
        return MODEL_SAVE_DIR
    raise UserError(f"model not found: neither {final} nor a model directory (config.json and "
                    f"model.safetensors) in {MODEL_SAVE_DIR} (train one, or pass --model_dir)")


class ChatBot:
    def __init__(self, config: InferConfig | None = None) -> None:
        self.config = config or InferConfig()
        model_path = self.model_path = find_model(self.config)
        tok_dir = tokenizer_dir_for(model_path, self.config)
        if self.config.search_type not in SEARCH_TYPES:
            raise UserError(f"search_type must be one of {', '.join(SEARCH_TYPES)}, got {self.config.search_type!r}")
        self.device = pick_device(self.config.device)
        self.dtype = pick_dtype(self.device, self.config.mixed_precision)
        self.tokenizer = load_tokenizer(tok_dir)
        model = load_model(model_path, dtype=self.dtype)
        check_vocab(self.tokenizer, model.config, where=str(model_path))
        self.model = model.to(self.device).eval()
        self.lock = threading.Lock()
        self.tokens_generated = 0  # decoding steps since start, all requests together (for /health)

    # ---- encoding / decoding -------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded input_ids/attention_mask on the model's device, each text ending in [EOS]."""
        ids = encode_texts(self.tokenizer, texts, self.config.max_seq_len)
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def _decode(self, ids: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [t if t.strip() else FALLBACK_ANSWER for t in texts]

    def count_tokens(self, text: str) -> int:
        return len(encode_texts(self.tokenizer, [text], self.config.max_seq_len)[0])

    # ---- generation ----------------------------------------------------------------------
    def _generation_config(self, max_new_tokens: int, temperature: float, top_p: float):
        gc = self.model.generation_config_for("greedy", max_new_tokens)
        if temperature > 0:
            gc.do_sample = True
            gc.temperature = temperature
            gc.top_p = top_p
            gc.top_k = 0  # OpenAI semantics: temperature and top_p only (transformers would add top_k=50)
        return gc

    def _generate_one(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                      control: GenerationControl, streamer=None) -> Answer:
        inputs = self.encode([prompt])
        prompt_tokens = int(inputs["input_ids"].shape[1])
        with self.lock:
            if control.stopped:  # its client left while it waited for the model
                if streamer is not None:
                    streamer.end()
                return Answer("", prompt_tokens, 0, "cancelled")
            try:
                out = self.model.generate(**inputs, generation_config=self._generation_config(
                    max_new_tokens, temperature, top_p), stopping_criteria=StoppingCriteriaList([control]),
                    streamer=streamer)
            finally:
                self.tokens_generated += control.steps
        new = out[0, 1:]  # drop the decoder start token
        eos = self.tokenizer.eos_token_id
        ended = bool((new == eos).any())
        completion_tokens = int((new == eos).nonzero()[0, 0]) + 1 if ended else int(new.numel())
        reason = "stop" if ended else ("cancelled" if control.stopped else "length")
        text = self.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Answer(text, prompt_tokens, completion_tokens, reason)

    def answer(self, prompt: str, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, control: GenerationControl | None = None) -> Answer:
        """One whole answer with token counts (greedy, or sampling when temperature > 0)."""
        result = self._generate_one(prompt, max_new_tokens or self.config.max_seq_len, temperature, top_p,
                                    control or GenerationControl())
        if not result.text.strip() and result.finish_reason != "cancelled":
            result.text = FALLBACK_ANSWER
        return result

    def stream_chat(self, text: str, max_new_tokens: int | None = None, temperature: float = 0.0,
                    top_p: float = 1.0, asynchronous: bool = False) -> AnswerStream:
        """Start answering `text` in a thread; iterate the result for the pieces (greedy by default).

        `asynchronous=True` (call it from a running event loop) makes the result an async
        iterator, so an async server never blocks its loop waiting for the next token.
        """
        return AnswerStream(self, text, max_new_tokens or self.config.max_seq_len, temperature, top_p,
                            asynchronous)

    @torch.no_grad()
    def chat(self, text: str | list[str], search_type: str | None = None,
             max_new_tokens: int | None = None) -> str | list[str]:
        """Answer one question (a str) or a batch (a list) with any of the project's search types."""
        if isinstance(text, str):
            texts, single = [text], True
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text) and text:
            texts, single = list(text), False
        else:
            raise TypeError("text must be a str or a non-empty list of str")
        search_type = search_type or self.config.search_type
        if search_type not in SEARCH_TYPES:
            raise ValueError(f"search_type must be one of {SEARCH_TYPES}, got {search_type!r}")
        inputs = self.encode(texts)
        with self.lock:
            out = self.model.my_generate(inputs["input_ids"], inputs["attention_mask"],
                                         max_seq_len=max_new_tokens or self.config.max_seq_len,
                                         search_type=search_type)
            self.tokens_generated += int(out.shape[1] - 1) * len(texts)
        answers = self._decode(out)
        return answers[0] if single else answers
