"""eval/eval_tasks.py: sentiment accuracy + baseline, entity F1, BLEU on generated answers."""
import json
from pathlib import Path

import pandas as pd
import pytest

from eval.tasks import EvalTasksConfig, evaluate_file, generate_answers, score, sentiment_scores
from utils.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
SENT = "判断下面这条评论的情感倾向，回答积极或消极。评论："
ENT = "请抽取出给定句子中的所有人名、地名和机构名。给定句子："


def test_sentiment_scores_exact():
    m = sentiment_scores(["积极", " 消极 ", "好评", "消极"], ["积极", "消极", "积极", "积极"])
    assert (m["correct"], m["rows"], m["accuracy"], m["unparseable"]) == (2, 4, 0.5, 1)
    assert (m["majority_label"], m["majority_baseline"]) == ("积极", 0.75)


def test_entity_and_bleu_scores():
    m = score("entity", ["[(江泽民,人名),(北京,地名),(北京,机构名)]", "[(新华社,机构名)]"],
              ["[(江泽民,人名),(北京,地名)]", "[(新华社,机构名),(上海,地名)]"])
    assert (m["true_positives"], m["predicted"], m["reference"]) == (3, 4, 4)
    assert m["f1"] == pytest.approx(0.75)
    assert score("bleu", ["今天天气很好"], ["今天天气很好"])["bleu4"] == pytest.approx(1.0)
    with pytest.raises(UserError):
        score("summary", ["a"], ["a"])


@pytest.fixture()
def task_files(tmp_path):
    sent = tmp_path / "sentiment_test.parquet"
    reviews = ["质量很好，物流也快", "非常满意，下次还来", "东西不错", "太差了，退货", "包装破损"]
    pd.DataFrame({"prompt": [SENT + r for r in reviews],
                  "response": ["积极", "积极", "积极", "消极", "消极"]}).to_parquet(sent)
    ent = tmp_path / "entity_test.parquet"
    pd.DataFrame({"prompt": [ENT + "江泽民在北京会见了代表", ENT + "新华社上海电"],
                  "response": ["[(江泽民,人名),(北京,地名)]", "[(新华社,机构名),(上海,地名)]"]}).to_parquet(ent)
    return sent, ent


def test_eval_tasks_with_tiny_model(chatty_model_dir, task_files, tmp_path):
    sent, ent = task_files
    out = tmp_path / "sent.json"
    m = evaluate_file(EvalTasksConfig(model_dir=str(chatty_model_dir), test_file=str(sent), task="sentiment",
                                      max_rows=4, batch_size=3, max_seq_len=12, max_new_tokens=6, output_json=str(out)))
    # the baseline comes from the references alone: 3 of the first 4 rows are 积极
    assert (m["rows"], m["majority_label"], m["majority_baseline"]) == (4, "积极", 0.75)
    assert 0.0 <= m["accuracy"] <= 1.0 and m["correct"] == round(m["accuracy"] * 4)
    assert json.loads(out.read_text(encoding="utf-8")) == m
    preds = [json.loads(line) for line in (tmp_path / "sent_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["reference"] for p in preds] == ["积极", "积极", "积极", "消极"]
    assert all(p["response"] and p["prompt"].startswith(SENT) for p in preds)

    m = evaluate_file(EvalTasksConfig(model_dir=str(chatty_model_dir), test_file=str(ent), task="entity",
                                      batch_size=2, max_seq_len=12, max_new_tokens=6, output_json=str(tmp_path / "ent.json")))
    assert m["reference"] == 4 and m["rows"] == 2
    assert all(0.0 <= m[k] <= 1.0 for k in ("f1", "precision", "recall"))
    # the predictions file is scored the same way by the info_extract evaluation
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "info_extract_evaluate", ROOT / "finetune_examples" / "info_extract" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    again = evaluate.evaluate(tmp_path / "ent_predictions.jsonl", ent, 2)
    assert again == {k: m[k] for k in again}

    with pytest.raises(UserError, match="--task"):
        evaluate_file(EvalTasksConfig(model_dir=str(chatty_model_dir), test_file=str(ent), task="ner"))


def test_generation_does_not_depend_on_batching(chatty_model_dir):
    from eval.common import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(chatty_model_dir)
    prompts = [SENT + "好", ENT + "江泽民在北京会见了来自上海的代表团", SENT + "一般般吧还行"]
    one_by_one = generate_answers(model, tokenizer, prompts, 1, 6)
    assert one_by_one == generate_answers(model, tokenizer, prompts, 3, 6)
    assert all(one_by_one) and len(set(one_by_one)) > 1  # real, prompt-dependent text


def test_lm_figures_against_the_models_own_loss(chatty_model_dir, tmp_path):
    """--task lm: loss over every row (teacher-forced, each token weighted once, whatever the
    batching), the unigram entropy of the same reference tokens, continuations of the first rows."""
    import math
    from collections import Counter

    import torch

    from eval.common import load_model_and_tokenizer
    from model.dataset import encode_batch

    model, tokenizer = load_model_and_tokenizer(chatty_model_dir)
    prompts = ["今天天气很好，", "人民日报记者报道，", "这本书写得", "北京"]
    refs = ["我们去公园散步吧。", "新年前夕各地举行活动。", "非常精彩，推荐。", "是中国的首都。"]
    f = tmp_path / "lm.parquet"
    pd.DataFrame({"prompt": prompts, "response": refs}).to_parquet(f)
    m = evaluate_file(EvalTasksConfig(model_dir=str(chatty_model_dir), test_file=str(f), task="lm", batch_size=3,
                                      max_seq_len=24, max_new_tokens=5, show_rows=2, output_json=str(tmp_path / "lm.json")))
    enc = encode_batch(tokenizer, prompts, refs, 24)
    nll, n = 0.0, 0
    with torch.no_grad():
        for a, b in zip(enc["input_ids"], enc["labels"]):  # one row at a time: no padding at all
            loss = model(input_ids=torch.tensor([a]), labels=torch.tensor([b])).loss.item()
            nll, n = nll + loss * len(b), n + len(b)
    assert (m["rows"], m["tokens"]) == (4, n)
    assert m["valid_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    counts = Counter(t for b in enc["labels"] for t in b)
    assert m["unigram_entropy"] == pytest.approx(-sum(c / n * math.log(c / n) for c in counts.values()))
    assert [s["prompt"] for s in m["samples"]] == prompts[:2] and all(s["response"] for s in m["samples"])
    assert [s["reference"] for s in m["samples"]] == refs[:2]


def test_answers_task_keeps_every_answer_unscored(chatty_model_dir, tmp_path):
    f = tmp_path / "probes.parquet"
    pd.DataFrame({"prompt": [SENT + "很好", "你好"], "response": ["积极", "(not taught)"]}).to_parquet(f)
    m = evaluate_file(EvalTasksConfig(model_dir=str(chatty_model_dir), test_file=str(f), task="answers",
                                      max_seq_len=16, max_new_tokens=4, output_json=str(tmp_path / "a.json")))
    assert m["rows"] == 2 and "accuracy" not in m
    assert [s["reference"] for s in m["samples"]] == ["积极", "(not taught)"] and all(s["response"] for s in m["samples"])


def test_repetition_penalty_breaks_the_loops_of_greedy_search(chatty_model_dir, tmp_path):
    """--repetition_penalty divides the scores of tokens already generated: the chatty model's
    greedy answers repeat their tokens (its previous token always scores high); with the penalty
    they repeat far less; 1 is plain greedy; the value is recorded in the JSON; < 1 is refused."""
    from eval.common import load_model_and_tokenizer
    from model.generation import generate_ids
    from utils.cli import UserError

    model, tokenizer = load_model_and_tokenizer(chatty_model_dir)
    prompts = ["今天天气很好，", "人民日报记者报道，", "这本书写得", "北京", SENT + "好", ENT + "江泽民在北京"]

    def repeated(penalty):
        rows = generate_ids(model, tokenizer, prompts, 24, 16, repetition_penalty=penalty).tolist()
        return rows, sum(len(ids) - len(set(ids)) for ids in rows)

    plain, plain_repeats = repeated(1.0)
    assert plain == generate_ids(model, tokenizer, prompts, 24, 16).tolist()
    penalised, penalised_repeats = repeated(5.0)
    assert plain_repeats > 0 and penalised_repeats < plain_repeats / 2, (plain_repeats, penalised_repeats)
    f = tmp_path / "lm.parquet"
    pd.DataFrame({"prompt": prompts[:2], "response": ["我们去公园散步吧。", "新年前夕各地举行活动。"]}).to_parquet(f)
    cfg = EvalTasksConfig(model_dir=str(chatty_model_dir), test_file=str(f), task="lm", max_seq_len=16,
                          max_new_tokens=8, repetition_penalty=1.3, output_json=str(tmp_path / "lm.json"))
    assert evaluate_file(cfg)["repetition_penalty"] == 1.3
    with pytest.raises(UserError, match=r"--repetition_penalty must be >= 1 \(1 = plain greedy\), got 0.5"):
        evaluate_file(EvalTasksConfig(**{**cfg.__dict__, "repetition_penalty": 0.5}))


def test_an_output_that_names_the_test_file_or_the_other_output_is_refused(tmp_path):
    """--output_json naming the test file replaced the test rows with the metrics; the metrics
    and the predictions named alike overwrote each other."""
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"prompt": "问", "response": "积极"}], ensure_ascii=False), encoding="utf-8")
    before = test.read_bytes()
    for over, message in [({"output_json": str(test)}, "--output_json and --test_file name the same file"),
                          ({"predictions_file": str(test)}, "--predictions_file and --test_file name the same file"),
                          ({"output_json": str(tmp_path / "m.json"), "predictions_file": str(tmp_path / "m.json")},
                           "--predictions_file and --output_json name the same file")]:
        with pytest.raises(UserError, match=f"^{message}"):
            evaluate_file(EvalTasksConfig(model_dir="unused", test_file=str(test), task="sentiment", **over))
    assert test.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["test.json"]


def test_how_many_test_prompts_max_seq_len_cuts_is_said(chatty_model_dir, capsys):
    """A test prompt cut at --max_seq_len may lose the very words its answer depends on (the
    quickstart's 128 cut 10% of the test reviews): that is now said, with the same answers."""
    from model.chat_model import load_model, load_tokenizer
    from model.generation import generate_batch

    model, tokenizer = load_model(chatty_model_dir).eval(), load_tokenizer(chatty_model_dir)
    prompts = ["今天天气怎么样，我们要不要出去走走", "好"]
    answers = generate_answers(model, tokenizer, prompts, 2, 6)
    assert capsys.readouterr().out.strip() == ("note: --max_seq_len 6 cuts 1 (50.0%) of the 2 test prompts "
                                               "([EOS] included)")
    assert answers == [a.strip() for a in generate_batch(model, tokenizer, prompts, 6, max_prompt_len=6, batch_size=2)]
    generate_answers(model, tokenizer, prompts, 2, 64)
    assert "note" not in capsys.readouterr().out
