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
training and is cut to `max_prompt_tokens`; an answer is at most `max_seq_len` tokens unless the
call says otherwise (model/generation.py: how every stage encodes, pads, generates and decodes).

`answer` and `stream_chat` (what the API uses) go through the bot's Batcher: answers asked for
concurrently are generated as one batch, each row ending at its own EOS or max_new_tokens or
when its caller stops it. One generation runs at a time on the model (a lock: the batcher's,
or `chat`'s for the CLI and evaluation).
"""
from __future__ import annotations

import asyncio
import atexit
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

import torch
from transformers import (AsyncTextIteratorStreamer, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList, TextIteratorStreamer, TopPLogitsWarper)

from config import MODEL_SAVE_DIR, InferConfig
from model.chat_model import SEARCH_TYPES, is_model_dir, load_model_and_tokenizer
from model.generation import decode_answers, encode_prompts, generate_ids, pad_prompts
from model.tokenizer import tokenizer_dir_for
from model.common import UserError, is_given
from model.harness import resolve_device, resolve_precision

# The original project's answer when the model generates nothing printable.
FALLBACK_ANSWER = "我是一个参数很少的AI模型🥺，知识库较少，无法直接回答您的问题，换个问题试试吧👋"


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


class Cancelled(Exception):
    """Raised by a batch's streamer to end contrastive search (which takes no stopping
    criteria) once every row of the batch has finished."""


class SamplingByRow(LogitsProcessor):
    """Temperature and top_p for each row of a batch (OpenAI semantics: temperature 0 is greedy).

    In place of transformers' TemperatureLogitsWarper, which divides the raw logits: with a tiny
    temperature (1e-40) they overflow to inf and sampling fails ("probability tensor contains
    inf"). Subtracting each row's maximum first keeps the best token at 0 and sends the others
    to -inf, so any temperature > 0 is well defined and tends to the greedy answer.
    """

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float]) -> None:
        self.temperatures = list(temperatures)
        self.top_ps = list(top_ps)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores - scores.max(dim=-1, keepdim=True).values
        rows = []
        for i, (temperature, top_p) in enumerate(zip(self.temperatures, self.top_ps)):
            row = scores[i:i + 1]
            if temperature <= 0:  # greedy row in a sampled batch: only its best token can be drawn
                rows.append(torch.where(row == 0, row, torch.full_like(row, -float("inf"))))
                continue
            row = row / temperature
            rows.append(TopPLogitsWarper(top_p)(input_ids[i:i + 1], row) if top_p < 1 else row)
        return torch.cat(rows)


@dataclass
class _Job:
    """One answer asked of the Batcher: its prompt, limits, stop switch, and (once done) result."""
    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    search_type: str  # "greedy" (sampling when temperature > 0), or my_generate's beam, sampling, contrastive
    control: GenerationControl
    streamer: TextIteratorStreamer | None  # gets the answer's tokens as they come (skip_prompt=False)
    tokens: list[int] = field(default_factory=list)
    answer: Answer | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


class _BatchRows(StoppingCriteria):
    """A running batch's bookkeeping, as the streamer and the stopping criterion of its generation.

    At every decoding step `generate` hands the streamer the step's token of every row (before
    asking the stopping criteria): each row's token goes to its own job, which finishes at its
    own EOS or max_new_tokens, or as soon as its client stops it; the criterion then tells
    `generate` which rows are done (they get padding from then on; the generation ends when
    all are). A job's answer is delivered when its row finishes, not at the end of the batch.
    """

    def __init__(self, bot: "ChatBot", jobs: list[_Job]) -> None:
        self.bot = bot
        self.jobs = jobs
        self.eos = bot.tokenizer.eos_token_id
        self.started = False
        self.raise_when_done = False  # contrastive search: end its loop by raising Cancelled

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the decoder start tokens
            self.started = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done.is_set():
                continue
            if job.control.stopped:
                self.bot._finish(job, "cancelled")
                continue
            job.tokens.append(token)
            self.bot.tokens_generated += 1
            if job.streamer is not None:
                try:
                    job.streamer.put(torch.tensor([token]))
                except Exception:  # its reader's event loop is gone: nobody is listening
                    job.control.stop()
            if token == self.eos:
                self.bot._finish(job, "stop")
            elif len(job.tokens) >= job.max_new_tokens:
                self.bot._finish(job, "length")
        if self.raise_when_done and all(job.done.is_set() for job in self.jobs):
            raise Cancelled

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [job.done.is_set() or job.control.stopped for job in self.jobs]
        if input_ids.shape[0] != len(done):  # beam search: num_beams rows for its one job
            done = [all(done)] * input_ids.shape[0]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Batcher:
    """Runs the answers asked for concurrently as batches, in one thread: the jobs waiting when
    a batch starts (up to max_batch_size, of the oldest job's search type) are generated
    together, each row finishing on its own; jobs arriving meanwhile wait for the next batch.
    Greedy and temperature sampling share batches (SamplingByRow applies each row's settings);
    beam search, which cannot stream, runs one job at a time. A decoding step of 8 rows costs
    little more than one of 1 (per-step overhead and reading the weights dominate: tiny config,
    one thread, `generate` of 64 tokens measured 13.5 ms a step for 1 row, 21.0 ms for 8), so
    concurrent clients share steps instead of queuing for the model (benchmarks/bench_serving.py;
    figures in the README).
    """

    def __init__(self, bot: "ChatBot", max_batch_size: int, batch_wait_ms: float) -> None:
        self.bot = bot
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.queue: deque[_Job] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running: list[_Job] = []  # the batch being generated
        self.closed = False
        _BATCHERS.add(self)

    def close(self, stop_jobs: bool = False) -> None:
        """End the thread once it has finished its jobs (stop_jobs: stopped within a decoding
        step); later submits raise. Called for every batcher at interpreter exit."""
        with self.cond:
            self.closed = True
            if stop_jobs:
                for job in [*self.queue, *self.running]:
                    job.control.stop()
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def submit(self, job: _Job) -> _Job:
        with self.cond:
            if self.closed:
                raise RuntimeError("this chat bot's batcher is closed")
            self.queue.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="chatbot-batcher", daemon=True)
                self.thread.start()
            self.cond.notify()
        return job

    def _take(self) -> list[_Job]:
        kind = self.queue[0].search_type
        limit = 1 if kind == "beam" else self.max_batch_size
        batch = [job for job in self.queue if job.search_type == kind][:limit]
        for job in batch:
            self.queue.remove(job)
        return batch

    def _next_batch(self) -> list[_Job] | None:
        """The next batch, marked running; None once the batcher is closed and its queue empty.

        A batch waits to fill up until batch_wait_ms after its oldest job arrived: clients that
        get their answers together ask again a few ms apart (an HTTP round trip), and without
        the wait the first one would start a batch of its own."""
        with self.cond:
            while True:
                while not self.queue:
                    if self.closed:
                        return None
                    self.cond.wait()
                left = self.queue[0].submitted + self.batch_wait - time.monotonic()
                if len(self.queue) >= self.max_batch_size or left <= 0:
                    self.running = self._take()
                    return self.running
                self.cond.wait(left)

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self.bot._generate_batch(batch)
            except BaseException as exc:  # handed to each waiting reader; the thread carries on
                for job in batch:
                    if not job.done.is_set():
                        job.error = exc
                        self.bot._finish(job, "error")
            with self.cond:
                self.running = []


_BATCHERS: "weakref.WeakSet[Batcher]" = weakref.WeakSet()


@atexit.register
def _close_batchers() -> None:
    """A job is answered as soon as its row ends, while `generate` may still be running. A daemon
    thread still in torch code when the interpreter finalizes is ended by pthread_exit, which
    unwinds through C++ and aborts the process ("terminate called without an active exception",
    exit status 134: 4 of 77 piped `cli_demo.py` runs). atexit runs before that: wait here,
    stopping what is left (nobody is waiting for those answers any more)."""
    for batcher in list(_BATCHERS):
        batcher.close(stop_jobs=True)


class AnswerStream:
    """One streamed answer: iterate (or `async for`) over its text pieces as they are generated.

    Generation runs in the bot's Batcher thread, batched with other concurrent answers. When it
    produced no printable text the stream yields FALLBACK_ANSWER instead; an error in the
    generation is raised to the reader. `stop()` ends the generation early; `answer` holds
    the totals once the stream is done.
    """

    def __init__(self, bot: "ChatBot", prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                 asynchronous: bool) -> None:
        self.control = GenerationControl()
        self._pieces: list[str] = []
        cls = AsyncTextIteratorStreamer if asynchronous else TextIteratorStreamer
        # decoding follows the tokenizer's own clean-up setting (on only for original-style
        # tokenizers: model.chat_model.restore_original_cleanup)
        self.streamer = cls(bot.tokenizer, skip_prompt=False, skip_special_tokens=True)
        self._job = bot._submit(prompt, max_new_tokens, temperature, top_p, "greedy", self.control, self.streamer)

    @property
    def answer(self) -> Answer | None:
        return self._job.answer

    @property
    def error(self) -> BaseException | None:
        return self._job.error

    def stop(self) -> None:
        self.control.stop()

    def join(self, timeout: float | None = None) -> bool:
        return self._job.done.wait(timeout)

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
        self._job.done.wait()
        yield from self._tail()

    async def __aiter__(self) -> AsyncIterator[str]:
        async for piece in self.streamer:
            if piece:
                self._pieces.append(piece)
                yield piece
        # The streamer ends as the job finishes; wait for that without blocking the loop.
        await asyncio.get_running_loop().run_in_executor(None, self._job.done.wait)
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
        if self.config.max_batch_size < 1:
            raise UserError(f"max_batch_size must be >= 1, got {self.config.max_batch_size}")
        if not 0 <= self.config.batch_wait_ms <= 10_000:
            raise UserError(f"batch_wait_ms must be 0-10000, got {self.config.batch_wait_ms}")
        self.device = resolve_device(self.config.device)
        # half precision on a GPU, fp32 on the CPU (where bf16 is hundreds of times slower)
        self.dtype = resolve_precision(self.config.mixed_precision, self.device).dtype
        model, self.tokenizer = load_model_and_tokenizer(model_path, tok_dir, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.lock = threading.Lock()  # one generation at a time on the model: the batcher's, or chat()'s
        self.batcher = Batcher(self, self.config.max_batch_size, self.config.batch_wait_ms)
        self.tokens_generated = 0  # decoding steps since start, all requests together (for /health)

    # ---- encoding (model.generation: as every stage encodes and pads prompts) -----------------
    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each question's tokens plus [EOS], cut to max_prompt_tokens."""
        return encode_prompts(self.tokenizer, texts, self.config.max_prompt_tokens)

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded input_ids/attention_mask on the model's device, each text ending in [EOS]."""
        return pad_prompts(self.tokenizer, self._encode(texts), self.device)

    def count_tokens(self, text: str) -> int:
        return len(self._encode([text])[0])

    def tokens_cut(self, text: str) -> int:
        """How many of the question's tokens ([EOS] included) fall beyond max_prompt_tokens and
        are cut from its end before the model reads it."""
        whole = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        return max(0, whole - self.config.max_prompt_tokens)

    # ---- generation ----------------------------------------------------------------------
    def _submit(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float, search_type: str,
                control: GenerationControl, streamer=None) -> _Job:
        """Queue one answer for the batcher; the returned job's `done` is set when it is ready."""
        ids = self._encode([prompt])[0]
        return self.batcher.submit(_Job(ids, max_new_tokens, temperature, top_p, search_type, control, streamer))

    def _finish(self, job: _Job, reason: str) -> None:
        """Deliver a job's answer (its row of the batch is done) and wake its reader."""
        text = decode_answers(self.tokenizer, [job.tokens])[0]
        job.answer = Answer(text, len(job.ids), len(job.tokens), reason)
        if job.streamer is not None:
            try:
                job.streamer.end()
            except Exception:  # its reader's event loop is gone
                pass
        job.done.set()

    @torch.no_grad()
    def _generate_batch(self, jobs: list[_Job]) -> None:
        """One generation for `jobs` (one search type; see Batcher), each row finishing on its own."""
        for job in jobs:
            if job.control.stopped:  # its client left while it waited
                self._finish(job, "cancelled")
        jobs = [job for job in jobs if not job.done.is_set()]
        if not jobs:
            return
        search_type = jobs[0].search_type
        inputs = pad_prompts(self.tokenizer, [job.ids for job in jobs], self.device)
        rows = _BatchRows(self, jobs)
        max_new = max(job.max_new_tokens for job in jobs)
        with self.lock:
            if search_type == "contrastive":  # my_generate's own loop: the rows end it by raising Cancelled
                rows.raise_when_done = True
                try:
                    self.model.my_generate(inputs["input_ids"], inputs["attention_mask"], max_seq_len=max_new,
                                           search_type=search_type, streamer=rows)
                except Cancelled:
                    pass
            else:
                gc = self.model.generation_config_for(search_type, max_new)
                processors = LogitsProcessorList()
                if search_type == "greedy" and any(job.temperature > 0 for job in jobs):
                    # sampling with temperature and top_p only, each row its own (OpenAI semantics)
                    gc.do_sample, gc.top_k = True, 0
                    processors.append(SamplingByRow([j.temperature for j in jobs], [j.top_p for j in jobs]))
                out = self.model.generate(**inputs, generation_config=gc, logits_processor=processors,
                                          stopping_criteria=StoppingCriteriaList([rows]),
                                          streamer=None if search_type == "beam" else rows)
                if search_type == "beam":  # transformers cannot stream beam search: hand over the result
                    for step in out.T:
                        rows.put(step.cpu())
        for job in jobs:
            if not job.done.is_set():
                self._finish(job, "cancelled" if job.control.stopped else "length")

    def answer(self, prompt: str, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, search_type: str = "greedy", control: GenerationControl | None = None) -> Answer:
        """One whole answer with token counts: greedy, or sampling when temperature > 0; another
        search type of my_generate's (beam, sampling, contrastive) with its own settings."""
        if search_type not in SEARCH_TYPES:
            raise ValueError(f"search_type must be one of {SEARCH_TYPES}, got {search_type!r}")
        job = self._submit(prompt, max_new_tokens or self.config.max_seq_len, temperature, top_p, search_type,
                           control or GenerationControl())
        job.done.wait()
        if job.error is not None:
            raise job.error
        result = job.answer
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
        with self.lock:  # model.generation: the encode, pad, generate, decode of every stage
            out = generate_ids(self.model, self.tokenizer, self._encode(texts),
                               max_new_tokens or self.config.max_seq_len, search_type=search_type)
            self.tokens_generated += int(out.shape[1] - 1) * len(texts)
        answers = [t if t.strip() else FALLBACK_ANSWER for t in decode_answers(self.tokenizer, out)]
        return answers[0] if single else answers
