"""Nothing executed, nothing lost (issue #12 sections 1 and 2, issue #14's train_state_dir).

- a checkpoint whose state file holds a pickle that would run `touch PWNED` is refused with a
  one-line error naming the file, on both trainers, and the command never runs;
- a damaged newest checkpoint (truncated optimiser state, weights, random state or
  trainer_state.json) gives way to the previous one, and the resume is still exact;
- output directories the project did not write are never replaced, a fresh run never mixes
  with an earlier one's checkpoints, and an evaluation is never logged twice.

Tiny config, 64 short pairs, in-process where a subprocess would only add start-up time.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY_CONFIG, another_process_holding_the_lock
from test_trainer import pairs_dir, read_losses, tiny_cfg, weights  # noqa: F401 (pairs_dir: a fixture)
from utils.cli import UserError

PY = sys.executable


class Evil:
    """What an attacker plants: unpickling it runs a shell command."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1")


def _one_line_error(proc) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def run4(pairs_dir, tokenizer_dir, tmp_path_factory):  # noqa: F811
    """A train.py run of 4 steps with checkpoints at steps 2 and 4 (and its config)."""
    from model.trainer import ChatTrainer

    out = tmp_path_factory.mktemp("run4") / "out"
    cfg = tiny_cfg(pairs_dir, tokenizer_dir, out, max_steps=4, save_steps=2, keep_latest_n_ckp=3)
    ChatTrainer(cfg).train()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-2", "checkpoint-4"]
    return cfg


def _copy_run(cfg, dst: Path):
    shutil.copytree(cfg.output_dir, dst)
    return replace(cfg, output_dir=str(dst))


# --- 1. no code execution --------------------------------------------------------------------

@pytest.mark.parametrize("state_file", ["optimizer.pt", "scheduler.pt", "rng_state_0.pt"])
def test_planted_pickle_in_a_train_checkpoint_is_refused(run4, tmp_path, monkeypatch, state_file):
    from model.trainer import ChatTrainer

    monkeypatch.chdir(tmp_path)
    cfg = _copy_run(run4, tmp_path / "run")
    ckpt = Path(cfg.output_dir) / "checkpoints" / "checkpoint-4"
    torch.save({"state": Evil()}, ckpt / state_file)
    with pytest.raises(UserError, match=re.escape(f"refusing to load {ckpt / state_file}: it holds pickled objects")):
        ChatTrainer(replace(cfg, is_keep_training=True, train_state_dir=str(ckpt))).train()
    # the same through "the newest checkpoint" (no train_state_dir): refused, not skipped
    with pytest.raises(UserError, match=re.escape(f"refusing to load {ckpt / state_file}")):
        ChatTrainer(replace(cfg, is_keep_training=True)).train()
    assert not (tmp_path / "PWNED").exists()


def test_planted_pickle_cli_is_one_line_and_never_runs(run4, tmp_path):
    """As the issue ran it: train.py train --is_keep_training True --train_state_dir <checkpoint>,
    here with a plain pickle.dump (not torch.save's zip format) as the optimiser state."""
    import pickle

    cfg = _copy_run(run4, tmp_path / "run")
    ckpt = Path(cfg.output_dir) / "checkpoints" / "checkpoint-4"
    with open(ckpt / "optimizer.pt", "wb") as fh:
        pickle.dump(Evil(), fh)
    args = ["--is_keep_training", "True", "--train_state_dir", ckpt, "--output_dir", cfg.output_dir,
            "--tokenizer_dir", cfg.tokenizer_dir, "--model_config_file", cfg.model_config_file,
            "--train_file", cfg.train_file, "--validation_file", cfg.validation_file, "--max_steps", 4,
            "--batch_size_per_gpu", 4, "--gradient_accumulation_steps", 2, "--seed", 7, "--streaming", "no",
            "--mixed_precision", "no", "--max_seq_len", 24]
    proc = subprocess.run([PY, str(ROOT / "train.py"), "train", *map(str, args)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    line = _one_line_error(proc)
    assert f"refusing to load {ckpt / 'optimizer.pt'}" in line
    assert not (tmp_path / "PWNED").exists()


@pytest.fixture(scope="module")
def hf_run(tokenizer_dir, pairs_dir, tmp_path_factory):  # noqa: F811
    """pre_train.py (the HF Trainer path), 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("hf_run") / "out"
    args = _hf_args(tokenizer_dir, pairs_dir, out)
    proc = subprocess.run([PY, str(ROOT / "pre_train.py"), *args], env=_env(), capture_output=True, text=True,
                          timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    return out


def _hf_args(tokenizer_dir, pairs_dir, out, **over) -> list[str]:  # noqa: F811
    args = {"model_config_file": TINY_CONFIG, "tokenizer_dir": tokenizer_dir, "train_file": pairs_dir / "train.parquet",
            "validation_file": pairs_dir / "valid.parquet", "output_dir": out, "max_steps": 4, "save_steps": 2,
            "logging_steps": 1, "batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "warmup_steps": 1,
            "max_seq_len": 24, "mixed_precision": "no", "eval_max_samples": 4, "seed": 7}
    args.update(over)
    return [str(x) for k, v in args.items() for x in (f"--{k}", v)]


def _hf_job(tokenizer_dir, pairs_dir, out, **over):  # noqa: F811
    from config import TrainConfig
    from model.hf_seq2seq import job_from_train_config
    from utils.cli import parse_config

    _, cfg = parse_config(TrainConfig, _hf_args(tokenizer_dir, pairs_dir, out, **over))
    return job_from_train_config(cfg)


@pytest.mark.parametrize("state_file", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"])
def test_planted_pickle_in_a_trainer_checkpoint_is_refused(hf_run, tokenizer_dir, pairs_dir, tmp_path,  # noqa: F811
                                                           monkeypatch, state_file):
    """transformers 5 loads with weights_only=True itself; the check before it turns a planted
    pickle into one line naming the file instead of the Trainer's traceback (and a .safetensors
    that is really a pickle into "damaged")."""
    from model.hf_seq2seq import run

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(hf_run, out)
    ckpt = out / "checkpoints" / "checkpoint-4"
    torch.save({"state": Evil()}, ckpt / state_file)
    expected = "refusing to load" if state_file != "model.safetensors" else "unreadable"
    with pytest.raises(UserError, match=f"{expected}.*{re.escape(str(ckpt / state_file))}"):
        run(_hf_job(tokenizer_dir, pairs_dir, out, is_keep_training=True, train_state_dir=ckpt))
    assert not (tmp_path / "PWNED").exists()


# --- 2a. damaged checkpoints -------------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", ["optimizer.pt", "model/model.safetensors", "rng_state_0.pt",
                                     "trainer_state.json", "missing:scheduler.pt"])
def test_damaged_newest_checkpoint_falls_back_exactly(run4, tmp_path, capsys, damaged):
    """The newest (step 4) is damaged: resume from step 2, warn naming step 4, end with the
    weights of the uninterrupted run."""
    from model.trainer import ChatTrainer

    cfg = _copy_run(run4, tmp_path / "run")
    root = Path(cfg.output_dir) / "checkpoints"
    if damaged.startswith("missing:"):  # what a kill in the middle of deleting it leaves
        damaged = damaged.split(":")[1]
        (root / "checkpoint-4" / damaged).unlink()
    else:
        _truncate(root / "checkpoint-4" / damaged)
    ChatTrainer(replace(cfg, is_keep_training=True)).train()
    err = capsys.readouterr().err
    assert f"warning: checkpoint {root / 'checkpoint-4'} is damaged" in err and damaged.split("/")[-1] in err
    assert (root / "damaged-checkpoint-4").is_dir()  # kept for inspection, out of the way
    a, b = weights(Path(run4.output_dir) / "best"), weights(Path(cfg.output_dir) / "best")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_losses(Path(cfg.output_dir)) == pytest.approx(read_losses(Path(run4.output_dir)), abs=1e-6)


def test_a_kill_while_pruning_never_leaves_a_partial_checkpoint(pairs_dir, tokenizer_dir, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    """Pruning deleted an old checkpoint file by file under its own name: killed half-way, a
    step-N with trainer_state.json and no weights looked complete (benchmarks/bench_reliability.py)."""
    import model.checkpoint as ckpt_io
    from model.trainer import ChatTrainer

    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):
        weights_file = Path(path) / "model" / "model.safetensors"
        if "checkpoint-2" in str(path) and weights_file.exists():
            weights_file.unlink()
            raise SystemExit(137)  # killed after the first file
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", killed_rmtree)
    cfg = tiny_cfg(pairs_dir, tokenizer_dir, tmp_path / "out", max_steps=4, save_steps=2, keep_latest_n_ckp=1)
    with pytest.raises(SystemExit):
        ChatTrainer(cfg).train()
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", real_rmtree)
    listed = ckpt_io.list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    assert [p.name for p in listed] == ["checkpoint-4"]
    assert all(ckpt_io.checkpoint_problem(p) is None for p in listed)


def test_no_usable_checkpoint_is_one_error(run4, tmp_path):
    from model.trainer import ChatTrainer

    cfg = _copy_run(run4, tmp_path / "run")
    root = Path(cfg.output_dir) / "checkpoints"
    _truncate(root / "checkpoint-4" / "optimizer.pt")
    _truncate(root / "checkpoint-2" / "scheduler.pt")
    with pytest.raises(UserError, match="no usable checkpoint under .*damaged: checkpoint-4, checkpoint-2"):
        ChatTrainer(replace(cfg, is_keep_training=True)).train()
    # a checkpoint named by the user: no silent fallback
    with pytest.raises(UserError, match="cannot resume from .*checkpoint-2: unreadable"):
        ChatTrainer(replace(cfg, is_keep_training=True,
                            train_state_dir=str(root / "damaged-checkpoint-2"))).train()


def test_damaged_trainer_checkpoint_falls_back(hf_run, tokenizer_dir, pairs_dir, tmp_path, capsys):  # noqa: F811
    from model.hf_seq2seq import run

    out = tmp_path / "out"
    shutil.copytree(hf_run, out)
    _truncate(out / "checkpoints" / "checkpoint-4" / "optimizer.pt")
    summary = run(_hf_job(tokenizer_dir, pairs_dir, out, is_keep_training=True))
    assert summary["resumed_from"] == str(out / "checkpoints" / "checkpoint-2") and summary["steps"] == 4
    assert f"checkpoint {out / 'checkpoints' / 'checkpoint-4'} is damaged" in capsys.readouterr().err


# --- 2b. output directories the project did not write -----------------------------------------

def _user_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "important.csv").write_text("a,b\n1,2\n")
    (path / "sub" / "notes.txt").write_text("mine")
    return path


def _intact(path: Path) -> bool:
    return (path / "important.csv").read_text() == "a,b\n1,2\n" and (path / "sub" / "notes.txt").read_text() == "mine"


def test_train_tokenizer_never_replaces_a_users_directory_or_file(corpus_file, tmp_path):
    def train_tok(out):
        return subprocess.run([PY, str(ROOT / "train_tokenizer.py"), "--corpus_file", str(corpus_file),
                               "--vocab_size", "600", "--output_dir", str(out)], env=_env(), capture_output=True,
                              text=True, timeout=300)

    users = _user_dir(tmp_path / "users")
    assert "holds files this project did not write (important.csv, sub/)" in _one_line_error(train_tok(users))
    assert _intact(users) and sorted(p.name for p in users.iterdir()) == ["important.csv", "sub"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert f"output {a_file} exists and is not a directory" in _one_line_error(train_tok(a_file))
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "users"]
    # its own output is replaced (twice: the second run replaces the first's)
    for _ in range(2):
        proc = train_tok(tmp_path / "tok")
        assert proc.returncode == 0, proc.stderr[-2000:]
    from model.chat_model import OUTPUT_MARKER

    assert "tokenizer.json" in json.loads((tmp_path / "tok" / OUTPUT_MARKER).read_text())["files"]


def test_a_tokenizer_never_replaces_a_model_directory(corpus_file, tiny_model_dir, tmp_path):
    """`train_tokenizer.py --output_dir model_save/sft/best` replaced the whole model directory
    (weights, config) with a tokenizer: the project wrote both, so the replacement was allowed."""
    from model.chat_model import load_model
    from model.tokenizer import save_tokenizer, train_tokenizer

    model_dir = tmp_path / "best"
    shutil.copytree(tiny_model_dir, model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    proc = subprocess.run([PY, str(ROOT / "train_tokenizer.py"), "--corpus_file", str(corpus_file),
                           "--vocab_size", "600", "--output_dir", str(model_dir)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert _one_line_error(proc) == (f"error: output directory {model_dir} holds a model: a tokenizer written "
                                     "there would replace it (choose another output directory, or move it away)")
    tokenizer = train_tokenizer(corpus_file, 600, progress=False)
    with pytest.raises(UserError, match="holds a model: a tokenizer written there would replace it"):
        save_tokenizer(tokenizer, model_dir)  # the one replacement path checks it too
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    load_model(model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary left


def test_a_model_never_replaces_a_tokenizer_directory(tiny_model_dir, tokenizer_dir, tmp_path):
    from model.chat_model import load_model, save_model

    shared = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, shared)
    with pytest.raises(UserError, match=r"holds a tokenizer: a model written there would replace it"):
        save_model(load_model(tiny_model_dir), shared)
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in tokenizer_dir.iterdir())


def test_save_model_replaces_only_project_directories(tiny_model_dir, tmp_path):
    from model.chat_model import OUTPUT_MARKER, load_model, save_model

    model = load_model(tiny_model_dir)
    users = _user_dir(tmp_path / "users")
    with pytest.raises(UserError, match="holds files this project did not write"):
        save_model(model, users)
    assert _intact(users) and sorted(p.name for p in tmp_path.iterdir()) == ["users"]  # no temporary left
    # a model directory written before the marker existed (the known file set) is replaced
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    (old / OUTPUT_MARKER).unlink()
    save_model(model, old)
    # a project directory to which a user added a file is not
    (old / "my_eval.csv").write_text("x")
    with pytest.raises(UserError, match=r"\(my_eval.csv\)"):
        save_model(model, old)
    assert (old / "my_eval.csv").read_text() == "x"


def test_dpo_merge_never_replaces_a_users_directory(tiny_model_dir, tmp_path):
    from peft import get_peft_model

    from config import DpoConfig
    from model import dpo
    from model.chat_model import load_model, load_tokenizer, save_model

    adapter = tmp_path / "adapter"
    cfg = replace(DpoConfig(), sft_model_file=str(tiny_model_dir), tokenizer_dir=str(tiny_model_dir),
                  adapter_dir=str(adapter), merged_output_dir=str(_user_dir(tmp_path / "users")))
    save_model(get_peft_model(load_model(tiny_model_dir), dpo.lora_config(cfg)), adapter,
               load_tokenizer(tiny_model_dir))
    with pytest.raises(UserError, match="holds files this project did not write"):
        dpo.merge(cfg)
    assert _intact(tmp_path / "users")
    a_file = tmp_path / "merged.bin"
    a_file.write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a directory"):
        dpo.merge(replace(cfg, merged_output_dir=str(a_file)))
    assert a_file.read_text() == "keep me"
    assert (dpo.merge(replace(cfg, merged_output_dir=str(tmp_path / "merged"))) / "model.safetensors").is_file()


# --- 2c. a fresh run never mixes with an earlier one --------------------------------------------

def test_fresh_train_run_refuses_existing_checkpoints_unless_told(run4, tmp_path):
    from model.trainer import ChatTrainer

    cfg = _copy_run(run4, tmp_path / "run")
    out = Path(cfg.output_dir)
    (out / "important.csv").write_text("mine")
    with pytest.raises(UserError, match="already holds checkpoints of an earlier run .*--overwrite_output_dir True"):
        ChatTrainer(replace(cfg, max_steps=2)).train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(UserError, match="choose one"):
        ChatTrainer(replace(cfg, is_keep_training=True, overwrite_output_dir=True)).train()
    ChatTrainer(replace(cfg, max_steps=2, overwrite_output_dir=True)).train()
    # only this run's checkpoint (step 4 of the old run would otherwise survive keep_latest_n_ckp)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert sorted(read_losses(out)) == [1, 2] and (out / "important.csv").read_text() == "mine"


def test_a_second_run_on_a_busy_output_dir_is_refused(run4, tmp_path):
    """Two runs on one --output_dir (the same command started twice) rotated away each other's
    checkpoints; with --overwrite_output_dir the second deleted the running one's. A run holds
    the directory's lock from begin_run on; the kernel frees it when the process ends."""
    from model.checkpoint import run_lock_file
    from model.trainer import ChatTrainer

    cfg = _copy_run(run4, tmp_path / "run")
    out = Path(cfg.output_dir)
    with another_process_holding_the_lock(out) as pid:
        with pytest.raises(UserError, match=f"another run \\(process {pid}\\) is writing to {re.escape(str(out))}"):
            ChatTrainer(replace(cfg, max_steps=2, overwrite_output_dir=True)).train()
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    ChatTrainer(replace(cfg, max_steps=2, overwrite_output_dir=True)).train()  # free once the holder is gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not any(p.name.endswith(".lock") for p in out.rglob("*")) and run_lock_file(out).parent != out


def test_fresh_dpo_run_refuses_existing_checkpoints(tiny_model_dir, tmp_path):
    from config import DpoConfig
    from model import dpo

    out = tmp_path / "dpo"
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
                                 [("今天天气", "晴朗", "下雨"), ("这本书", "很好", "太差"), ("手机", "耐用", "易坏"),
                                  ("酒店", "周到", "冷淡")]], ensure_ascii=False))
    cfg = replace(DpoConfig(), sft_model_file=str(tiny_model_dir), tokenizer_dir=str(tiny_model_dir),
                  dpo_train_file=str(pairs), dpo_eval_file="", output_dir=str(out), max_steps=1,
                  per_device_train_batch_size=4, gradient_accumulation_steps=1, optim="adamw_torch",
                  mixed_precision="no", save_steps=1, max_seq_len=16, warmup_steps=0)
    with pytest.raises(UserError, match="already holds checkpoints of an earlier run .*--resume_from_checkpoint last"):
        dpo.train(cfg)
    dpo.train(replace(cfg, overwrite_output_dir=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]


def test_a_run_never_writes_into_a_model_directory(tiny_model_dir, pairs_dir, tmp_path):  # noqa: F811
    """--output_dir naming a model directory (model_save/pretrain/best for model_save/sft, say)
    filled it with checkpoints/, runs/ and logs: it could then never be replaced as a model."""
    model_dir = tmp_path / "best"
    shutil.copytree(tiny_model_dir, model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    proc = subprocess.run([PY, str(ROOT / "sft_train.py"), "--finetune_from_ckp_file", str(tiny_model_dir),
                           "--sft_train_file", str(pairs_dir / "train.parquet"), "--output_dir", str(model_dir),
                           "--max_steps", "1", "--mixed_precision", "no"], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert _one_line_error(proc) == (f"error: --output_dir {model_dir} is a model directory: a run writes its "
                                     "best/, checkpoints/ and logs into --output_dir; choose another directory")
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_test_and_eval_commands_never_write_into_a_model_or_over_their_input(run4, tiny_model_dir, tmp_path):
    """`train.py test --output_dir <a model>` put test_results.json into the model directory;
    `dpo_train.py eval --eval_output_file` naming the eval pairs replaced them with the report."""
    from config import DpoConfig
    from model import dpo
    from model.trainer import ChatTrainer

    model_dir = tmp_path / "best"
    shutil.copytree(tiny_model_dir, model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(UserError, match=r"is a model directory: a run writes test_results\.json into --output_dir"):
        ChatTrainer(replace(run4, output_dir=str(model_dir), test_model_dir=str(Path(run4.output_dir) / "best"))).test()
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": "今天天气", "chosen": "晴朗", "rejected": "下雨"}], ensure_ascii=False))
    cfg = replace(DpoConfig(), sft_model_file=str(tiny_model_dir), tokenizer_dir=str(tiny_model_dir),
                  model=str(tiny_model_dir), dpo_eval_file=str(pairs), output_dir=str(model_dir))
    with pytest.raises(UserError, match=r"is a model directory: a run writes preference_eval\.json"):
        dpo.evaluate(cfg)
    with pytest.raises(UserError, match=r"^--eval_output_file and --dpo_eval_file name the same file"):
        dpo.evaluate(replace(cfg, eval_output_file=str(pairs)))
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert json.loads(pairs.read_text()) == [{"prompt": "今天天气", "chosen": "晴朗", "rejected": "下雨"}]


def test_eval_row_is_not_logged_twice_after_a_kill_between_eval_and_checkpoint(pairs_dir, tokenizer_dir,  # noqa: F811
                                                                               tmp_path):
    """8 steps = one epoch; the checkpoint at step 8 (save_steps) is written before the epoch's
    evaluation; a kill after the evaluation's row, before the checkpoint that follows it, used
    to leave that row in eval.csv and the resume wrote it again."""
    from model.trainer import ChatTrainer

    class KilledAfterEval(ChatTrainer):
        def _evaluate_and_keep_best(self, *args, **kwargs):
            super()._evaluate_and_keep_best(*args, **kwargs)
            raise SystemExit(137)  # what kill -9 leaves: the row written, no checkpoint after it

    cfg = tiny_cfg(pairs_dir, tokenizer_dir, tmp_path / "out", max_steps=8, save_steps=8)
    with pytest.raises(SystemExit):
        KilledAfterEval(cfg).train()
    assert pd.read_csv(tmp_path / "out" / "eval.csv")["step"].tolist() == [8]
    ChatTrainer(replace(cfg, is_keep_training=True)).train()
    assert pd.read_csv(tmp_path / "out" / "eval.csv")["step"].tolist() == [8]


# --- issue #14: train_state_dir is where the state is written and read back ---------------------

def test_train_state_dir_is_written_and_resumed_exactly(pairs_dir, tokenizer_dir, tmp_path):  # noqa: F811
    import signal

    from model.trainer import ChatTrainer

    n_steps, k = 6, 3
    straight = tiny_cfg(pairs_dir, tokenizer_dir, tmp_path / "straight", max_steps=n_steps)
    ChatTrainer(straight).train()

    state_dir = tmp_path / "train_latest_state"
    cfg = replace(straight, output_dir=str(tmp_path / "out"), train_state_dir=str(state_dir))

    def stop_at_k(trainer, step):
        if step == k:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit):
        ChatTrainer(cfg, callbacks=[stop_at_k]).train()
    assert [p.name for p in state_dir.iterdir()] == [f"checkpoint-{k}"]
    assert not (tmp_path / "out" / "checkpoints").exists()
    ChatTrainer(replace(cfg, is_keep_training=True)).train()
    assert read_losses(tmp_path / "out") == pytest.approx(read_losses(tmp_path / "straight"), abs=1e-6)
    a, b = weights(tmp_path / "straight" / "best"), weights(tmp_path / "out" / "best")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert sorted(p.name for p in state_dir.iterdir()) == [f"checkpoint-{k}", f"checkpoint-{n_steps}"]


def test_pre_train_writes_and_resumes_in_train_state_dir(tokenizer_dir, pairs_dir, tmp_path):  # noqa: F811
    from model.hf_seq2seq import run

    state_dir, out = tmp_path / "train_latest_state", tmp_path / "out"
    run(_hf_job(tokenizer_dir, pairs_dir, out, max_steps=2, train_state_dir=state_dir))
    assert [p.name for p in state_dir.iterdir()] == ["checkpoint-2"] and not (out / "checkpoints").exists()
    summary = run(_hf_job(tokenizer_dir, pairs_dir, out, max_steps=4, train_state_dir=state_dir,
                          is_keep_training=True))
    assert summary["resumed_from"] == str(state_dir / "checkpoint-2") and summary["steps_this_run"] == 2
