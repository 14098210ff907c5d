"""ChatBot (model/infer.py): loading every model format, streaming, batch answers, stop, fallback."""
import shutil

import pytest
import torch

from config import InferConfig
from model.chat_model import SEARCH_TYPES, load_tokenizer
from model.dataset import encode_texts
from model.infer import FALLBACK_ANSWER, ChatBot
from utils.cli import UserError

MAX_NEW = 12



@pytest.fixture(scope="module")
def bot(chatty_model_dir):
    return ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=MAX_NEW))


def test_loads_on_cpu_in_fp32(bot):
    assert bot.device.type == "cpu" and bot.dtype == torch.float32
    assert next(bot.model.parameters()).dtype == torch.float32


def test_question_gets_eos_appended_like_training(bot):
    ids = bot.encode(["感冒了要怎么办"])["input_ids"][0].tolist()
    assert ids[-1] == bot.tokenizer.eos_token_id
    assert ids == encode_texts(bot.tokenizer, ["感冒了要怎么办"], bot.config.max_prompt_tokens)[0]


def test_max_seq_len_caps_the_answer_and_max_prompt_tokens_cuts_the_question(bot, chatty_model_dir):
    """max_seq_len is the longest answer (the original's meaning); it used to cut the question too."""
    question = "今天天气怎么样，我想出去走走，可以吗？还是在家里看书比较好"
    whole = len(encode_texts(bot.tokenizer, [question], 10_000)[0])
    short = ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=4))
    assert whole > 4
    answer = short.answer(question)
    assert (answer.prompt_tokens, answer.completion_tokens) == (whole, 4)
    assert short.chat(question) == bot.chat(question, max_new_tokens=4)
    cut = ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=4, max_prompt_tokens=5))
    assert cut.answer(question).prompt_tokens == 5
    assert cut.encode([question])["input_ids"][0].tolist() == encode_texts(bot.tokenizer, [question], 5)[0]
    with pytest.raises(UserError, match="max_prompt_tokens"):
        InferConfig(max_prompt_tokens=1)


def test_stream_matches_greedy_chat(bot):
    stream = bot.stream_chat("你好")
    pieces = list(stream)
    assert len(pieces) > 1, "the answer must arrive in several pieces"
    assert "".join(pieces) == bot.chat("你好", search_type="greedy")
    assert stream.answer.finish_reason == "length" and stream.answer.completion_tokens == MAX_NEW
    assert stream.answer.text == "".join(pieces)


def test_batch_chat_answers_each_question(bot):
    questions = ["你好", "感冒了要怎么办"]
    answers = bot.chat(questions)
    assert isinstance(answers, list) and len(answers) == 2
    assert answers == [bot.chat(q) for q in questions]  # padding does not change a greedy answer
    assert all(a and a != FALLBACK_ANSWER for a in answers)


@pytest.mark.parametrize("search_type", SEARCH_TYPES)
def test_every_search_type_answers(bot, search_type):
    answer = bot.chat("今天天气怎么样", search_type=search_type, max_new_tokens=6)
    assert isinstance(answer, str) and answer.strip()


def test_sampling_follows_temperature_and_top_p(bot):
    torch.manual_seed(1)
    a = bot.answer("你好", max_new_tokens=8, temperature=1.5, top_p=0.95)
    torch.manual_seed(1)
    b = bot.answer("你好", max_new_tokens=8, temperature=1.5, top_p=0.95)
    assert a.text == b.text and a.completion_tokens == 8  # seeded sampling is reproducible
    greedy = bot.answer("你好", max_new_tokens=8)
    assert greedy.text == bot.chat("你好", max_new_tokens=8)


def test_stop_ends_a_long_generation_early(bot):
    before = bot.tokens_generated
    stream = bot.stream_chat("你好", max_new_tokens=1024)
    it = iter(stream)
    next(it), next(it)
    stream.stop()
    assert stream.join(timeout=30)
    assert stream.answer.finish_reason == "cancelled"
    assert stream.answer.completion_tokens < 1024
    assert bot.tokens_generated - before < 1024


def test_generation_error_reaches_the_reader(bot):
    stream = bot.stream_chat("你好", temperature=1.0, top_p=-1.0)  # transformers refuses top_p < 0
    with pytest.raises(ValueError, match="top_p"):
        list(stream)
    assert stream.join(timeout=5)


def test_empty_generation_gets_the_original_fallback(silent_model_dir):
    silent = ChatBot(InferConfig(model_dir=str(silent_model_dir), max_seq_len=6))
    assert silent.chat("你好") == FALLBACK_ANSWER
    assert silent.chat(["你好", "再见"]) == [FALLBACK_ANSWER, FALLBACK_ANSWER]
    assert list(silent.stream_chat("你好")) == [FALLBACK_ANSWER]
    assert silent.answer("你好").text == FALLBACK_ANSWER


def test_loads_safetensors_file_and_legacy_bin(bot, chatty_model_dir, tmp_path):
    expected = bot.chat("你好")
    from_file = ChatBot(InferConfig(model_dir=str(chatty_model_dir / "model.safetensors"), max_seq_len=MAX_NEW))
    assert from_file.chat("你好") == expected
    # A legacy checkpoint: a pickled state dict with the original wrapper's "model." prefix,
    # next to the config and tokenizer; read with weights_only=True.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in chatty_model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, legacy / f.name)
    torch.save({f"model.{k}": v for k, v in bot.model.state_dict().items()}, legacy / "chat_small_t5.bin")
    from_bin = ChatBot(InferConfig(model_dir=str(legacy / "chat_small_t5.bin"), max_seq_len=MAX_NEW))
    assert from_bin.chat("你好") == expected


def test_separate_tokenizer_dir(chatty_model_dir, tokenizer_dir, tmp_path):
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(chatty_model_dir / name, weights_only / name)
    with pytest.raises(UserError, match="no tokenizer"):
        ChatBot(InferConfig(model_dir=str(weights_only)))
    ok = ChatBot(InferConfig(model_dir=str(weights_only), tokenizer_dir=str(tokenizer_dir), max_seq_len=4))
    assert len(ok.tokenizer) == len(load_tokenizer(tokenizer_dir))


def test_a_directory_that_is_no_model_is_named_before_the_tokenizer(tmp_path):
    """--model_dir pointing at a folder without config.json is the mistake to report, not the
    tokenizer that would be looked for next to it or in model_save/tokenizer."""
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserError, match="not a model directory \\(no config.json\\): .*notes"):
        ChatBot(InferConfig(model_dir=str(tmp_path / "notes"), tokenizer_dir=str(tmp_path / "no_tokenizer")))
    from eval.common import load_model_and_tokenizer  # the evaluation scripts' and DPO data's loader

    with pytest.raises(UserError, match="not a model directory \\(no config.json\\): .*notes"):
        load_model_and_tokenizer(tmp_path / "notes")


def test_bad_settings_are_one_line_errors(chatty_model_dir, tmp_path):
    with pytest.raises(UserError, match="model not found"):
        ChatBot(InferConfig(model_dir=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="device"):
        ChatBot(InferConfig(model_dir=str(chatty_model_dir), device="tpu"))
    with pytest.raises(UserError, match="search_type"):
        ChatBot(InferConfig(model_dir=str(chatty_model_dir), search_type="best"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            ChatBot(InferConfig(model_dir=str(chatty_model_dir), device="cuda"))


# ---- concurrent answers are batched (model/infer.py Batcher) ----------------------------------
@pytest.fixture()
def batch_sizes(bot, monkeypatch):
    """The size of every batch the bot's batcher generates during the test."""
    sizes = []
    real = bot._generate_batch

    def spy(jobs):
        sizes.append(len(jobs))
        return real(jobs)

    monkeypatch.setattr(bot, "_generate_batch", spy)
    return sizes


def start_long_answer(bot):
    """A streamed 1,024-token answer, running once its first piece is out: the batcher is busy."""
    stream = bot.stream_chat("占线", max_new_tokens=1024)
    pieces = iter(stream)
    next(pieces)
    return stream


def test_requests_arriving_during_a_batch_share_the_next_one(bot, batch_sizes):
    import concurrent.futures

    questions = {"你好": 3, "感冒了要怎么办": 7, "今天天气怎么样": 5, "再见": 12}
    expected = {q: bot.chat(q, max_new_tokens=n) for q, n in questions.items()}
    batch_sizes.clear()
    busy = start_long_answer(bot)
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        futures = {q: pool.submit(bot.answer, q, n) for q, n in questions.items()}
        while len(bot.batcher.queue) < len(questions):  # all four wait while the long answer runs
            assert not busy.join(0.01)
        busy.stop()
        answers = {q: f.result(timeout=60) for q, f in futures.items()}
    assert batch_sizes == [1, 4]
    for q, n in questions.items():  # each its own answer, ending at its own max_tokens
        assert answers[q].text == expected[q] and answers[q].completion_tokens == n
        assert answers[q].finish_reason == "length"


def test_a_client_that_leaves_drops_out_of_its_batch(bot, batch_sizes):
    busy = start_long_answer(bot)
    streams = [bot.stream_chat(q, max_new_tokens=40) for q in ("你好", "感冒了要怎么办", "再见")]
    busy.stop()
    pieces = iter(streams[1])
    next(pieces), next(pieces)
    streams[1].stop()
    rest = list(pieces)
    texts = ["".join(s) for s in (streams[0], streams[2])]
    assert batch_sizes[-1] == 3
    assert streams[1].answer.finish_reason == "cancelled" and streams[1].answer.completion_tokens < 40
    assert len(rest) < 38
    for s, text, q in zip((streams[0], streams[2]), texts, ("你好", "再见")):
        assert s.answer.finish_reason == "length" and s.answer.completion_tokens == 40
        assert text == bot.chat(q, max_new_tokens=40)


def test_greedy_and_sampled_rows_share_a_batch(bot, batch_sizes):
    expected = bot.chat("你好", max_new_tokens=8)
    busy = start_long_answer(bot)
    greedy = bot.stream_chat("你好", max_new_tokens=8)
    sampled = bot.stream_chat("你好", max_new_tokens=8, temperature=1.5, top_p=0.9)
    tiny = bot.stream_chat("你好", max_new_tokens=8, temperature=1e-40)
    busy.stop()
    assert "".join(greedy) == expected and "".join(tiny) == expected  # a tiny temperature is greedy
    assert sampled.join(30) and sampled.answer.completion_tokens == 8
    assert batch_sizes[-1] == 3


def test_each_row_stops_at_its_own_eos(tiny_model_dir, tmp_path):
    """A model whose [EOS] wins at once (its embedding row: 50 x that of [PAD], the decoder's start
    token): every row of a batch ends after one token, and so does the batch's generation."""
    from tests.conftest import _edit_embeddings

    eos_dir = _edit_embeddings(tiny_model_dir, tmp_path / "eos", lambda emb: emb[1].copy_(emb[0] * 50.0))
    eos_bot = ChatBot(InferConfig(model_dir=str(eos_dir), max_seq_len=50))
    with eos_bot.batcher.cond:  # the batcher waits: the three answers queue up and run as one batch
        streams = [eos_bot.stream_chat(q, max_new_tokens=50) for q in ("你好", "感冒了要怎么办", "再见")]
    results = [list(s) for s in streams]
    assert results == [[FALLBACK_ANSWER]] * 3
    assert all(s.answer.finish_reason == "stop" and s.answer.completion_tokens == 1 for s in streams)
    assert eos_bot.tokens_generated == 3


# ---- the batcher's thread at exit (model/infer.py Batcher.close, _close_batchers) -------------
EXIT_RACE = '''
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
from model.infer import Batcher, GenerationControl, _Job

class Bot:
    def _generate_batch(self, jobs):
        for job in jobs:
            job.done.set()  # answered as soon as its row ends, as _BatchRows does
        a = torch.ones(1500, 1500)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:  # generate's remaining steps: the thread is in torch code
            a = (a @ a).clamp_(max=1.0)

torch.set_num_threads(1)
batcher = Batcher(Bot(), max_batch_size=1, batch_wait_ms=0)
batcher.submit(_Job([1], 1, 0.0, 1.0, "greedy", GenerationControl(), None)).done.wait()
print("answered")
'''


def test_the_process_exits_cleanly_while_the_batcher_is_still_in_torch(tmp_path):
    """A daemon thread still inside torch when Python finalizes is ended by pthread_exit, which
    aborts the process (status 134, "terminate called without an active exception"): cli_demo.py
    ended that way in 4 of 77 piped runs. The batchers are closed at exit first."""
    import subprocess
    import sys

    from config import PROJECT_ROOT

    script = tmp_path / "exit_race.py"
    script.write_text(EXIT_RACE, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), str(PROJECT_ROOT)], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "answered"), done.stderr[-2000:]
    assert "terminate called" not in done.stderr


def test_close_stops_the_running_job_and_refuses_new_ones():
    import threading
    import time

    from model.infer import Batcher, GenerationControl, _Job

    started = threading.Event()

    class Bot:
        def _generate_batch(self, jobs):
            started.set()
            deadline = time.monotonic() + 30
            while not jobs[0].control.stopped and time.monotonic() < deadline:  # a long answer
                time.sleep(0.01)
            jobs[0].done.set()

    def job():
        return _Job([1], 1, 0.0, 1.0, "greedy", GenerationControl(), None)

    batcher = Batcher(Bot(), max_batch_size=1, batch_wait_ms=0)
    running = batcher.submit(job())
    assert started.wait(10)
    t0 = time.monotonic()
    batcher.close(stop_jobs=True)
    assert time.monotonic() - t0 < 5 and running.control.stopped and running.done.is_set()
    assert not batcher.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(job())
