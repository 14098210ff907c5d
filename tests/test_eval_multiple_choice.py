"""C-Eval / CMMLU evaluation on fixture files in each benchmark's official layout."""
import csv
import sys
from pathlib import Path

import pytest

from eval.multiple_choice import (CEVAL, CMMLU, ModelScorer, MultipleChoiceConfig,
                                  build_prompts, category_table, load_questions, run)
from eval.subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS
from utils.cli import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "eval" / "fixtures"


def always(letter):
    return lambda prompts: [letter] * len(prompts)


def read_csv(path):
    with open(path, encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_official_mappings_are_complete():
    assert len(CEVAL_SUBJECTS) == 52 and len(CMMLU_SUBJECTS) == 67
    counts = {c: sum(v[1] == c for v in CEVAL_SUBJECTS.values()) for c in CEVAL.categories}
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert CMMLU.subject_categories("chinese_history") == ("Humanities", "China specific")
    assert CMMLU.subject_categories("computer_science") == ("STEM",)


def test_reads_both_official_layouts():
    ceval = load_questions(CEVAL, FIXTURES / "ceval", "val")
    assert list(ceval) == ["computer_network", "high_school_politics", "logic", "physician"]
    q = ceval["computer_network"][1]
    assert (q.id, q.question, q.options[1], q.answer) == ("1", "DNS的主要功能是____。", "将域名解析为IP地址", "B")
    dev = load_questions(CEVAL, FIXTURES / "ceval", "dev")  # has the extra explanation column
    assert dev["logic"][0].answer == "A"
    test = load_questions(CEVAL, FIXTURES / "ceval", "test", need_answers=False)  # no answer column
    assert test["physician"][0].answer == ""
    with pytest.raises(UserError, match="no public answers"):
        load_questions(CEVAL, FIXTURES / "ceval", "test")
    cmmlu = load_questions(CMMLU, FIXTURES / "cmmlu", "test")  # unnamed index column, Question/Answer
    assert [len(v) for v in cmmlu.values()] == [2, 3, 2]
    assert cmmlu["chinese_history"][2].question == "中国第一部纪传体通史是____。"
    assert cmmlu["chinese_history"][2].answer == "B"


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="no C-Eval subject files"):
        load_questions(CEVAL, tmp_path, "val")
    (tmp_path / "val" / "logic_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 2: answer 'E'"):
        load_questions(CEVAL, tmp_path, "val")
    (tmp_path / "val" / "logic_val.csv").write_text("id,question,A,B,C\n0,q,a,b,c\n", encoding="utf-8")
    with pytest.raises(UserError, match="missing column"):
        load_questions(CEVAL, tmp_path, "val")


def test_category_table_counts_exactly(tmp_path):
    # answers in the C-Eval fixture: STEM A,B,A  Social C,A  Humanities A,D  Other B,B,A
    rows = run(CEVAL, MultipleChoiceConfig(data_dir=str(FIXTURES / "ceval"), output_dir=str(tmp_path)),
               scorer=always("A"))
    assert [(r.category, r.correct, r.question_count) for r in rows] == [
        ("STEM", 2, 3), ("Social Science", 1, 2), ("Humanities", 1, 2), ("Other", 1, 3), ("Overall", 5, 10)]
    table = read_csv(tmp_path / "ceval_val_0shot.csv")
    assert table[0] == ["category", "correct", "question_count", "accuracy"]
    assert table[1] == ["STEM", "2", "3", "0.6667"] and table[-1] == ["Overall", "5", "10", "0.5000"]
    preds = read_csv(tmp_path / "ceval_val_0shot_predictions.csv")
    assert len(preds) == 11 and preds[1] == ["computer_network", "0", "A", "A"]

    # CMMLU: chinese_history counts in Humanities and China specific, once in Overall;
    # answers: chinese_history A,A,B  computer_science B,A  agronomy C,D
    rows = run(CMMLU, MultipleChoiceConfig(data_dir=str(FIXTURES / "cmmlu"), output_dir=str(tmp_path)),
               scorer=always("B"))
    assert [(r.category, r.correct, r.question_count) for r in rows] == [
        ("STEM", 1, 2), ("Humanities", 1, 3), ("Other", 0, 2), ("China specific", 1, 3), ("Overall", 2, 7)]
    assert (tmp_path / "cmmlu_test_0shot.csv").is_file()

    # a scorer that knows the answers scores 100%
    questions = [q for qs in load_questions(CMMLU, FIXTURES / "cmmlu", "test").values() for q in qs]
    assert category_table(CMMLU, questions, [q.answer for q in questions])[-1].accuracy == 1.0


def test_few_shot_prompts_and_length_budget():
    val = load_questions(CEVAL, FIXTURES / "ceval", "val")
    dev = load_questions(CEVAL, FIXTURES / "ceval", "dev")
    q = val["logic"][0]
    zero = build_prompts(CEVAL, [q], dev, 0)[0]
    assert zero == ("以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n\n"
                    "“有的学生是党员”是____判断。\nA. 特称肯定\nB. 全称肯定\nC. 单称否定\nD. 全称否定\n答案：")
    two = build_prompts(CEVAL, [q], dev, 2)[0]
    assert two.count("答案：") == 3 and "概念的两个逻辑特征是____。" in two and "答案：A\n\n" in two
    assert two.endswith(zero.split("\n\n", 1)[1])
    # examples are dropped until the prompt fits; the question itself always stays
    one = build_prompts(CEVAL, [q], dev, 2, fits=lambda text: len(text) < len(two) - 10)[0]
    assert one.count("答案：") == 2
    assert build_prompts(CEVAL, [q], dev, 2, fits=lambda text: False)[0] == zero
    cm = load_questions(CMMLU, FIXTURES / "cmmlu", "test")["agronomy"][0]
    assert build_prompts(CMMLU, [cm], {}, 0)[0].startswith("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n题目：")


def test_tiny_model_scorer(tiny_model_dir, tmp_path):
    from eval.common import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    scorer = ModelScorer(model, tokenizer, batch_size=3, max_seq_len=64)
    prompts = build_prompts(CEVAL, [q for qs in load_questions(CEVAL, FIXTURES / "ceval", "val").values()
                                    for q in qs], {}, 0)
    logits = scorer.choice_logits(prompts)
    assert tuple(logits.shape) == (10, 4)
    # batching and padding do not change a question's scores
    single = ModelScorer(model, tokenizer, batch_size=1, max_seq_len=64).choice_logits(prompts[:4])
    assert single.numpy() == pytest.approx(logits[:4].numpy(), abs=1e-4)
    letters = scorer(prompts)
    assert set(letters) <= {"A", "B", "C", "D"} and len(letters) == 10
    rows = run(CMMLU, MultipleChoiceConfig(data_dir=str(FIXTURES / "cmmlu"), n_shot=2, max_seq_len=64,
                                           output_dir=str(tmp_path)), scorer=scorer)
    assert rows[-1].question_count == 7 and 0 <= rows[-1].correct <= 7


def test_c_eval_script_main_from_another_directory(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("c_eval_script", ROOT / "eval" / "c_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["c_eval.py", "--data_dir", str(FIXTURES / "ceval"), "--model_dir",
                                      str(tiny_model_dir), "--n_shot", "1", "--output_dir", "out"])
    script.main()
    out = capsys.readouterr().out
    assert "Overall" in out and "question_count" in out
    table = read_csv(tmp_path / "out" / "ceval_val_1shot.csv")  # relative paths: from the current directory
    assert [r[0] for r in table[1:]] == ["STEM", "Social Science", "Humanities", "Other", "Overall"]
    assert table[-1][2] == "10"
    monkeypatch.setattr(sys, "argv", ["c_eval.py", "--data_dir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exc:
        run_cli(script.main)
    assert exc.value.code == 2 and "C-Eval data directory not found" in capsys.readouterr().err


def test_results_never_go_into_a_model_directory(tiny_model_dir, tmp_path):
    """--output_dir model_save/sft/best put the two result CSVs into the model directory."""
    import shutil

    model_dir = tmp_path / "best"
    shutil.copytree(tiny_model_dir, model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(UserError, match=r"is a model directory: a run writes its result tables into --output_dir"):
        run(CEVAL, MultipleChoiceConfig(data_dir=str(FIXTURES / "ceval"), output_dir=str(model_dir)), scorer=always("A"))
    assert sorted(p.name for p in model_dir.iterdir()) == before
