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
