"""The whole pipeline, cut down (`quickstart.py --small True`): every stage runs through the
project's own scripts and leaves its outputs; a rerun skips finished stages; `--from` redoes
from a stage on; a failing stage is named with the command that reruns it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run_quickstart(workdir, *args, timeout=1500):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # many short processes: one thread each is fastest
    return subprocess.run([sys.executable, str(ROOT / "quickstart.py"), "--small", "True", "--workdir", str(workdir),
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart")
    res = run_quickstart(workdir)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return workdir, res


def test_every_stage_produced_its_outputs(pipeline):
    from utils.pipeline import QuickstartConfig, build_stages

    workdir, res = pipeline
    stages = build_stages(QuickstartConfig(workdir=str(workdir), small=True))
    state = json.loads((workdir / "model_save" / "quickstart" / "state.json").read_text())
    for st in stages:
        assert state[st.name]["ok"], st.name
        for path in st.outputs:
            assert path.exists(), (st.name, path)
    final = workdir / "model_save" / "final"
    assert {"config.json", "model.safetensors", "modeling_chat_model.py", "tokenizer.json"} <= {p.name for p in final.iterdir()}


def test_report_card_has_every_section(pipeline):
    from model.pairs import read_rows

    workdir, _ = pipeline
    report = (workdir / "model_save" / "report" / "report.md").read_text(encoding="utf-8")
    for needle in ("## Corpus", "sft_train.parquet", "pretrain (train.py)", "SFT (sft_train.py)", "DPO, LoRA",
                   "BLEU-4", "sentiment accuracy", "majority baseline", "entity extraction F1",
                   "preference accuracy", "SFT (before DPO)", "torch", "cores",
                   "## What pretraining learnt", "validation perplexity", "unigram entropy of the same split",
                   "pretrained model's continuation", "## The final model's answers", "请介绍一下你自己"):
        assert needle in report, needle
    # the pretraining figures and the continuations come from the lm stage's JSON, one table row each
    lm = json.loads((workdir / "model_save" / "report" / "eval" / "pretrain_lm.json").read_text(encoding="utf-8"))
    assert lm["unigram_entropy"] > 0 and lm["valid_loss"] > 0 and len(lm["samples"]) == 5
    assert f"| validation loss (nats/token) | {lm['valid_loss']:.4f} |" in report
    # the pretraining pairs the card names are the corpus's: continuation and denoising pairs (mixed)
    assert "Pretraining pairs (`--pretrain_objective mixed`)" in report
    assert lm["repetition_penalty"] == 1.3 and "repetition penalty 1.3" in report
    pairs = read_rows(workdir / "data" / "demo" / "pretrain_train.parquet", ("prompt", "response"), "pairs")
    assert 0 < sum("[MASK]" in r["prompt"] for r in pairs) < len(pairs)
    pretraining = report.split("## What pretraining learnt")[1].split("## Evaluation")[0]
    assert sum(line.startswith("| ") for line in pretraining.splitlines()) == 2 + 6 + 2 + 5
    chat = report.split("## The final model's answers")[1].split("## Stage wall times")[0]
    assert sum(line.startswith("| ") for line in chat.splitlines()) == 2 + 5
    assert (workdir / "model_save" / "report" / "pretrain_loss.png").is_file()
    assert "| n/a | n/a |" not in report.split("## Training")[1].split("## Evaluation")[0]


def test_chat_with_the_final_model(pipeline):
    from model.infer import ChatBot
    from config import InferConfig

    workdir, _ = pipeline
    bot = ChatBot(InferConfig(model_dir=str(workdir / "model_save" / "final"), max_seq_len=8))
    answer = bot.chat("你好")
    assert isinstance(answer, str) and answer


def test_rerun_skips_and_from_redoes(pipeline):
    workdir, _ = pipeline
    res = run_quickstart(workdir, "--from", "merge")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = " ".join(res.stdout.split())  # rich wraps long lines
    assert "pretrain" in out and "skipped" in out
    for stage in ("merge", "dpo_eval_after", "eval_final_sentiment", "eval_final_entity", "chat_final"):
        assert f"✓ {stage}" in out and f"{stage}" in out
    assert out.count("skipped") == 11  # the eleven stages before merge


def test_failing_stage_is_named_with_its_command(tmp_path):
    users = tmp_path / "model_save" / "pretrain" / "best"  # not the project's: train.py will not replace it
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine", encoding="utf-8")
    res = run_quickstart(tmp_path, timeout=600)
    assert res.returncode == 2
    err = " ".join(res.stderr.split())
    assert "stage 'pretrain' failed" in err
    assert "holds files this project did not write (notes.txt)" in " ".join(res.stdout.split())  # the log's tail
    assert "rerun it with: cd " in err and "train.py train" in err
    assert (users / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_the_model_config_is_read_from_the_users_directory_and_checked_first(tmp_path):
    """A relative --model_config_file was looked up from the project root (where the stages
    run), and a missing or bad one failed only at the pretrain stage, after the corpus and the
    tokenizer had been built."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "bad.json").write_text('{"d_model": 3}', encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for config, why in [("missing.json", f"model config file not found: {here / 'missing.json'}"),
                        ("bad.json", f"{here / 'bad.json'}: d_model (3) must equal num_heads * d_kv")]:
        res = subprocess.run([sys.executable, str(ROOT / "quickstart.py"), "--small", "True", "--workdir", "w",
                              "--model_config_file", config], cwd=here, capture_output=True, text=True,
                             timeout=120, env=env)
        assert res.returncode == 2 and res.stderr.startswith(f"error: {why}"), res.stderr
        assert not (here / "w" / "data").exists()  # no stage ran
    from utils.pipeline import QuickstartConfig, build_stages

    os.chdir(here)
    try:
        (pretrain,) = [st for st in build_stages(QuickstartConfig(workdir="w", model_config_file="bad.json"))
                       if st.name == "pretrain"]
    finally:
        os.chdir(ROOT)
    assert pretrain.argv[pretrain.argv.index("--model_config_file") + 1] == str(here / "bad.json")


def test_unknown_stage_is_rejected(tmp_path):
    res = run_quickstart(tmp_path, "--from", "pretraining", timeout=120)
    assert res.returncode == 2
    assert "--from 'pretraining' is not a stage" in res.stderr


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path):
    """--workdir under a file (or /proc, or no permission) was a traceback of nested mkdir errors."""
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    res = run_quickstart(tmp_path / "afile" / "qs", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: --workdir {tmp_path / 'afile' / 'qs'} cannot be written: " \
                                 f"{tmp_path / 'afile'} is a file, not a directory"


def test_a_second_quickstart_in_the_same_workdir_is_refused(tmp_path):
    from conftest import another_process_holding_the_lock

    with another_process_holding_the_lock(tmp_path) as pid:
        res = run_quickstart(tmp_path, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"another run (process {pid}) is writing to {tmp_path.resolve()}" in res.stderr
    assert "choose another --workdir" in res.stderr and not (tmp_path / "data").exists()
