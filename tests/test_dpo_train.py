"""DPO (model/dpo_trainer.py, model/dpo.py, dpo_train.py): the loss against hand-computed
values, log-probs against the model's own loss, full DPO raising margin and accuracy on its
training pairs, resume, LoRA with the adapter-disabled reference, merge, evaluation."""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from config import DpoConfig
from model.dpo_trainer import dpo_loss, pair_logps, PreferenceCollator, encode_pairs
from model.run_summary import read_summary
from utils.cli import UserError

# short texts from the embedded corpus: a prompt, the reference answer and a worse one
PAIRS = [("今天天气", "晴朗温暖", "下雨很冷"), ("这本书", "内容很好", "纸质太差"), ("手机质量", "非常耐用", "容易坏掉"),
         ("酒店服务", "热情周到", "态度冷淡"), ("北京的", "秋天很美", "风沙很大"), ("这部电影", "感人至深", "无聊透顶"),
         ("快递速度", "第二天到", "等了一周"), ("孩子喜欢", "爱不释手", "看都不看")]



@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dpo_pairs") / "pairs.json"
    path.write_text(json.dumps([dict(zip(("prompt", "chosen", "rejected"), p)) for p in PAIRS], ensure_ascii=False),
                    encoding="utf-8")
    return path


def _cfg(tiny_model_dir, pair_file, out: Path, **kw) -> DpoConfig:
    base = dict(sft_model_file=str(tiny_model_dir), tokenizer_dir=str(tiny_model_dir), dpo_train_file=str(pair_file),
                dpo_eval_file="", output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                learning_rate=2e-3, warmup_steps=0, optim="adamw_torch", logging_steps=1, save_steps=2,
                max_seq_len=32, eval_batch_size=8)
    base.update(kw)
    return replace(DpoConfig(), **base)


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0])
    rc, rr = torch.tensor([-11.0, -3.5]), torch.tensor([-11.0, -2.5])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 1: rewards 0.1*1 = 0.1 and 0.1*(-1) = -0.1, margin 0.2: -log(sigmoid(0.2)) = log(1 + e^-0.2)
    # pair 2: rewards 0.05 and 0.05, margin 0: log 2
    assert torch.allclose(chosen, torch.tensor([0.1, 0.05])) and torch.allclose(rejected, torch.tensor([-0.1, 0.05]))
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.2)), math.log(2.0)], abs=1e-6)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)


def test_pair_logps_match_the_models_own_loss(tiny_model_dir):
    """Summed answer log-probs equal -(token-mean cross-entropy x tokens) from T5's labels path."""
    from model.chat_model import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    enc = encode_pairs(tok, [p[0] for p in PAIRS[:3]], [p[1] for p in PAIRS[:3]], ["差" * (i + 1) for i in range(3)], 32)
    batch = PreferenceCollator(tok.pad_token_id)([dict(zip(enc, v)) for v in zip(*enc.values())])
    with torch.no_grad():
        got = pair_logps(model, batch, model.config.decoder_start_token_id, model.config.pad_token_id)
        for i in range(3):
            for side in ("chosen", "rejected"):
                labels = batch[f"{side}_labels"][i:i + 1]
                labels = labels[:, : int((labels != -100).sum())]
                loss = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1],
                             labels=labels).loss
                assert got[side][i].item() == pytest.approx(-loss.item() * labels.size(1), rel=1e-4)
                assert got[f"{side}_len"][i].item() == labels.size(1)


def test_full_dpo_raises_margin_and_accuracy_and_resumes(tiny_model_dir, pair_file, tmp_path):
    from model import dpo
    from model.chat_model import load_model

    out = tmp_path / "dpo"
    cfg = _cfg(tiny_model_dir, pair_file, out, max_steps=4)
    before = dpo.evaluate(replace(cfg, model=str(tiny_model_dir), dpo_eval_file=str(pair_file),
                                  eval_output_file=str(tmp_path / "before.json")))
    assert before["reward_margin"] == 0 and before["reward_accuracy"] == 0  # the reference against itself
    best = dpo.train(cfg)
    assert (out / "checkpoints" / "checkpoint-4").is_dir() and (best / "model.safetensors").is_file()
    after = dpo.evaluate(replace(cfg, model=str(best), dpo_eval_file=str(pair_file),
                                 eval_output_file=str(tmp_path / "after.json")))
    assert after["reward_margin"] > 0.05 and after["reward_accuracy"] >= 0.75
    assert after["policy_logp_accuracy"] > before["policy_logp_accuracy"]
    assert after["reference_logp_accuracy"] == before["policy_logp_accuracy"]
    assert json.loads((tmp_path / "after.json").read_text())["pairs"] == len(PAIRS)
    with open(out / "train_loss.csv", encoding="utf-8") as fh:
        import csv
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference before step 1
    assert float(rows[-1]["rewards/margins"]) > 0 and "rewards/accuracies" in rows[0]

    # resume from the last checkpoint and train two more steps
    first = load_model(best).state_dict()
    dpo.train(replace(cfg, max_steps=6, resume_from_checkpoint="last"))
    with open(out / "train_loss.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    summary = read_summary(out / "train_summary.json")
    assert (summary.steps, summary.steps_this_run, summary.trainer, summary.stage) == (6, 2, "DPO", "dpo")
    assert summary.final_train_loss == float(rows[-1]["loss"]) and summary.train_tokens > 0
    assert summary.eval_loss is None and summary.model_dir == str(best)
    assert (out / "loss_curve.png").stat().st_size > 1000
    second = load_model(best).state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_lora_dpo_reference_merge_and_auto_loading(tiny_model_dir, pair_file, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from model import dpo
    from model.chat_model import load_model, load_tokenizer

    out = tmp_path / "lora"
    cfg = _cfg(tiny_model_dir, pair_file, out, max_steps=3, use_lora=True, learning_rate=1e-2,
               merged_output_dir=str(tmp_path / "merged"))
    adapter = dpo.train(cfg)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    with open(out / "train_loss.csv", encoding="utf-8") as fh:
        import csv
        rows = list(csv.DictReader(fh))
    # the adapter starts at zero, so the disabled-adapter reference equals the policy
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(rows[0]["rewards/margins"]) == 0.0

    # resume the adapter's training from checkpoint-2: steps 3 and 4 are (re)done
    assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    adapter = dpo.train(replace(cfg, max_steps=4, resume_from_checkpoint=str(out / "checkpoints" / "checkpoint-2")))
    with open(out / "train_loss.csv", encoding="utf-8") as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["1", "2", "3", "4"]
    assert read_summary(out / "train_summary.json").steps == 4

    merged_dir = dpo.merge(cfg)
    import warnings
    with warnings.catch_warnings(record=True) as caught:  # peft's deprecated transformers call, silenced
        warnings.simplefilter("always")
        peft_model = dpo.load_adapter_model(adapter, tiny_model_dir).eval()
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    merged = load_model(merged_dir).eval()
    sft = load_model(tiny_model_dir).eval()
    tok = load_tokenizer(merged_dir)
    enc = tok(["今天天气[EOS]", "这本书写得[EOS]"], return_tensors="pt", padding=True, add_special_tokens=False)
    dec = tok(["晴朗温暖", "内容很好"], return_tensors="pt", padding=True, add_special_tokens=False).input_ids
    with torch.no_grad():
        kw = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, decoder_input_ids=dec)
        lp, lm, ls = peft_model(**kw).logits, merged(**kw).logits, sft(**kw).logits
    assert torch.allclose(lp, lm, atol=1e-5)
    assert (lm - ls).abs().max() > 1e-3  # the adapter changed the model

    auto = AutoModelForSeq2SeqLM.from_pretrained(str(merged_dir), trust_remote_code=True).eval()
    ids = auto.my_generate(enc.input_ids, enc.attention_mask, max_seq_len=5, search_type="greedy")
    assert ids.shape[0] == 2 and 2 <= ids.shape[1] <= 6
    with torch.no_grad():
        assert torch.allclose(auto(**kw).logits, lm, atol=1e-5)

    scores = dpo.evaluate(replace(cfg, model=str(adapter), dpo_eval_file=str(pair_file),
                                  eval_output_file=str(tmp_path / "lora_eval.json")))
    assert scores["reward_margin"] > 0


def test_bad_input_is_one_line_error(tiny_model_dir, pair_file, tmp_path, monkeypatch, capsys):
    from model import dpo

    with pytest.raises(UserError, match="DPO training file not found"):
        dpo.train(_cfg(tiny_model_dir, tmp_path / "missing.json", tmp_path / "o"))
    with pytest.raises(UserError, match="--beta must be a finite number > 0"):
        dpo.train(_cfg(tiny_model_dir, pair_file, tmp_path / "o", beta=0.0))
    with pytest.raises(UserError, match="no checkpoint under"):
        dpo.train(_cfg(tiny_model_dir, pair_file, tmp_path / "o", resume_from_checkpoint="last"))
    with pytest.raises(UserError, match="not a LoRA adapter directory"):
        dpo.merge(_cfg(tiny_model_dir, pair_file, tmp_path / "o", adapter_dir=str(tiny_model_dir)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError) as err:  # one line, with where and why
        dpo.evaluate(_cfg(tiny_model_dir, pair_file, tmp_path / "o", dpo_eval_file=str(broken),
                          model=str(tiny_model_dir)))
    assert str(err.value) == (f"DPO eval file has no valid prompt/chosen/rejected rows: {broken} "
                              f"(1 malformed, first: {broken}:line 1: missing key: 'rejected')")

    import dpo_train
    from utils.cli import run_cli
    monkeypatch.setattr(sys, "argv", ["dpo_train.py", "merge", "--adapter_dir", str(tmp_path / "nope"),
                                      "--sft_model_file", str(tiny_model_dir)])
    with pytest.raises(SystemExit) as exc:
        run_cli(dpo_train.main)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: not a LoRA adapter directory")


@pytest.mark.parametrize("use_lora", [False, True])
def test_precomputed_reference_log_probs_give_the_same_training(tiny_model_dir, pair_file, tmp_path, use_lora):
    """--precompute_ref_log_probs True scores each pair with the reference once, before
    training; the losses, metrics and final weights equal those of the per-step reference."""
    import csv

    from model import dpo
    from model.chat_model import load_model

    runs = {}
    for flag in (False, True):
        out = tmp_path / f"pre{int(flag)}"
        cfg = _cfg(tiny_model_dir, pair_file, out, max_steps=3, save_steps=2, dpo_eval_file=str(pair_file),
                   use_lora=use_lora, precompute_ref_log_probs=flag,
                   # LoRA's dropout draws random masks; with it on, the two runs differed from
                   # step 2 by 0.004 in loss (masks drawn in a different generator state)
                   lora_dropout=0.0)
        best = dpo.train(cfg)
        logs = []
        for name in ("train_loss.csv", "eval.csv"):
            with open(out / name, encoding="utf-8") as fh:
                logs.append(list(csv.DictReader(fh)))
        runs[flag] = (logs, best)
    (plain, best_plain), (cached, best_cached) = runs[False], runs[True]
    assert [r["step"] for r in plain[0]] == [r["step"] for r in cached[0]] and len(plain[0]) >= 3
    assert [r["step"] for r in plain[1]] == [r["step"] for r in cached[1]] == ["2", "3"]  # every save_steps and at the end
    # the eval set's reference log-probs are cached too
    for log_plain, log_cached, keys in ((plain[0], cached[0], ("loss", "rewards/margins", "rewards/chosen")),
                                        (plain[1], cached[1], ("valid_loss", "rewards/margins", "rewards/chosen"))):
        for a, b in zip(log_plain, log_cached):
            for key in keys:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["step"], key)
    if not use_lora:
        wa, wb = load_model(best_plain).state_dict(), load_model(best_cached).state_dict()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_lora_dpo_is_the_same_run_for_the_same_seed(tiny_model_dir, pair_file, tmp_path):
    """--seed decides LoRA's initial A matrices, not whatever state the random generator was
    left in before dpo.train (before the fix, a draw before the second run changed its adapter)."""
    from safetensors.torch import load_file

    from model import dpo

    adapters = []
    for i in range(2):
        torch.rand(1000 * (i + 1))  # leave the generator in a different state each time
        cfg = _cfg(tiny_model_dir, pair_file, tmp_path / f"run{i}", max_steps=2, use_lora=True, lora_dropout=0.0,
                   learning_rate=1e-2)
        adapters.append(load_file(str(dpo.train(cfg) / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


def test_dpo_says_how_many_pairs_max_seq_len_cuts(tiny_model_dir, capsys):
    from model import dpo
    from model.chat_model import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    rows = [{"prompt": "今天天气怎么样我们出去走走吧", "chosen": "好", "rejected": "不"},
            {"prompt": "好", "chosen": "今天天气很好适合出门散步", "rejected": "不"},
            {"prompt": "好", "chosen": "好", "rejected": "今天天气不好不要出门了"}]
    ds = dpo._dataset(rows, tok, 6)
    assert capsys.readouterr().out.strip() == ("note: --max_seq_len 6 cuts 1 (33.3%) of the 3 preference prompts and "
                                               "2 (66.7%) of the responses ([EOS] included)")
    assert ds.column_names == ["input_ids", "chosen_labels", "rejected_labels"]
