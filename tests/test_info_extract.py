"""Tuple parsing and micro F1 (utils.metrics) and the triple-extraction example scripts."""
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from utils.cli import UserError, run_cli
from utils.metrics import format_tuples, parse_tuples, tuple_prf

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "finetune_examples" / "info_extract"


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"info_extract_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_tuples_tolerates_brackets_quotes_and_junk():
    assert parse_tuples("[(江泽民,人名),(北京,地名),(新华社,机构名)]", 2) == [
        ("江泽民", "人名"), ("北京", "地名"), ("新华社", "机构名")]
    # full-width brackets and commas, spaces and quotes around fields
    assert parse_tuples("[（周杰伦，出生地，台湾）, ( '周杰伦' , 国籍 , \"中国\" )]", 3) == [
        ("周杰伦", "出生地", "台湾"), ("周杰伦", "国籍", "中国")]
    # truncated last tuple, wrong arity, empty field, stray text: only well-formed ones stay
    assert parse_tuples("答案[(a,b,c),(d,e),(f,,g),(h,i,j),(k,l", 3) == [("a", "b", "c"), ("h", "i", "j")]
    assert parse_tuples("[(a,b),(c,d,e)]") == [("a", "b"), ("c", "d", "e")]  # any arity >= 2
    assert parse_tuples("[(a)]") == [] and parse_tuples("") == [] and parse_tuples(None) == []
    assert parse_tuples(format_tuples([("神雕侠侣", "作者", "金庸")]), 3) == [("神雕侠侣", "作者", "金庸")]


def test_tuple_prf_exact_partial_duplicate_malformed_empty():
    gold = ["[(a,b,c),(d,e,f)]", "[(g,h,i)]"]
    exact = tuple_prf(["[(d,e,f),(a,b,c)]", "[(g,h,i)]"], gold, 3)  # order does not matter
    assert (exact["f1"], exact["precision"], exact["recall"]) == (1.0, 1.0, 1.0)
    # partial: 2 of 3 predicted tuples right, 2 of 3 reference tuples found
    part = tuple_prf(["[(a,b,c)]", "[(g,h,i),(x,y,z)]"], gold, 3)
    assert (part["true_positives"], part["predicted"], part["reference"]) == (2, 3, 3)
    assert part["precision"] == pytest.approx(2 / 3) and part["recall"] == pytest.approx(2 / 3)
    assert part["f1"] == pytest.approx(2 / 3)
    # a repeated tuple counts once: P = 1/1, R = 1/3, F1 = 0.5
    dup = tuple_prf(["[(a,b,c),(a,b,c),(a,b,c)]", "[]"], gold, 3)
    assert (dup["predicted"], dup["precision"]) == (1, 1.0)
    assert dup["recall"] == pytest.approx(1 / 3) and dup["f1"] == pytest.approx(0.5)
    # malformed output: the well-formed tuple inside is scored, the rest ignored; no crash
    bad = tuple_prf(["[(a,b,c),(d,e", "胡言乱语)(("], gold, 3)
    assert (bad["true_positives"], bad["predicted"], bad["reference"]) == (1, 1, 3)
    assert bad["precision"] == 1.0 and bad["recall"] == pytest.approx(1 / 3)
    # empty predictions: nothing right
    empty = tuple_prf(["[]", ""], gold, 3)
    assert (empty["f1"], empty["precision"], empty["recall"]) == (0.0, 0.0, 0.0)
    # nothing to find and nothing predicted is perfect; predicting something then is not
    assert tuple_prf(["[]"], ["[]"], 3)["f1"] == 1.0
    assert tuple_prf(["[(a,b,c)]"], ["[]"], 3)["f1"] == 0.0
    with pytest.raises(ValueError):
        tuple_prf(["[]"], gold, 3)


def test_data_process_reads_both_duie_versions(tmp_path):
    dp = _load("data_process")
    rows = dp.convert_file(EXAMPLE / "sample_duie.json")
    assert [r["response"] for r in rows] == [
        "[(邪少兵王,作者,冰火未央)]",
        "[(神雕侠侣,作者,金庸)]",  # the duplicate triple is written once
        "[(周杰伦,出生日期,1979年1月18日),(周杰伦,出生地,台湾省新北市)]",
        "[(喜剧之王,导演,周星驰),(喜剧之王,主演,周星驰)]",  # DuIE 1.0 string objects
        "[]",  # no spo_list (test set)
    ]
    assert rows[0]["prompt"] == "请抽取出给定句子中的所有三元组。给定句子：《邪少兵王》是冰火未央写的网络小说连载于旗峰天下"
    as_array = tmp_path / "duie_array.json"  # the same objects as one JSON array
    as_array.write_text(json.dumps([json.loads(line) for line in (EXAMPLE / "sample_duie.json").read_text(
        encoding="utf-8").splitlines() if line.strip()], ensure_ascii=False), encoding="utf-8")
    assert dp.convert_file(as_array) == rows
    out = tmp_path / "out" / "duie.parquet"
    dp.write_pairs(out, ((r["prompt"], r["response"]) for r in rows))
    table = pq.read_table(out)
    assert table.column_names == ["prompt", "response"] and table.num_rows == 5

    bad = tmp_path / "bad.json"
    bad.write_text('{"text": "a", "spo_list": []}\n{"text": "b", "spo_list": [{"subject": "x"}]}\n',
                   encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json line 2: spo_list\[0\]: expected subject, predicate and object$"):
        dp.convert_file(bad)
    bad.write_text('{"text": "a"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"^DuIE input file .*bad\.json line 1: bad JSON"):
        dp.convert_file(bad)
    bad.write_bytes('{"text": "a", "spo_list": []}\n'.encode() + '{"text": "中文"}\n'.encode("gbk"))
    with pytest.raises(UserError, match=r"bad\.json line 2: not UTF-8: .*; save it as UTF-8"):
        dp.convert_file(bad)


def test_data_process_checks_its_output_before_reading(tmp_path, monkeypatch):
    """An --output_file under a file was a traceback after the whole input had been converted."""
    dp = _load("data_process")
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["data_process.py", "--input_file", str(tmp_path / "not_read.json"),
                                      "--output_file", str(tmp_path / "afile" / "duie.parquet")])
    with pytest.raises(UserError, match=r"^--output_file .*duie\.parquet cannot be written: .*afile is a file"):
        dp.main()


def test_evaluate_script_on_jsonl_and_parquet(tmp_path, monkeypatch, capsys):
    dp = _load("data_process")
    gold = tmp_path / "gold.parquet"
    dp.write_pairs(gold, ((r["prompt"], r["response"]) for r in dp.convert_file(EXAMPLE / "sample_duie.json")))
    preds = ["[(邪少兵王,作者,冰火未央)]", "[（神雕侠侣，作者，金庸）,(神雕侠侣,作者,金庸)]",
             "[(周杰伦,出生地,台湾省新北市),(周杰伦,国籍,中国", "[(喜剧之王,导演,吴孟达)]", "[]"]
    pred_file = tmp_path / "preds.jsonl"
    pred_file.write_text("".join(json.dumps({"response": p}, ensure_ascii=False) + "\n" for p in preds),
                         encoding="utf-8")
    # 3 right of 4 predicted, of 6 reference triples
    metrics = _load("evaluate").evaluate(pred_file, gold, 3)
    assert (metrics["true_positives"], metrics["predicted"], metrics["reference"]) == (3, 4, 6)
    assert metrics["precision"] == 0.75 and metrics["recall"] == 0.5
    assert metrics["f1"] == pytest.approx(0.6)

    # the script's main, run from another directory; a row-count mismatch is a one-line error
    evaluate = _load("evaluate")
    out_json = tmp_path / "m.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--pred_file", "preds.jsonl", "--gold_file", str(gold),
                                      "--output_json", str(out_json)])
    evaluate.main()
    assert json.loads(out_json.read_text())["f1"] == pytest.approx(0.6)
    assert "F1 0.6000" in capsys.readouterr().out
    (tmp_path / "short.jsonl").write_text('{"response": "[]"}\n', encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--pred_file", "short.jsonl", "--gold_file", str(gold)])
    with pytest.raises(SystemExit) as exc:
        run_cli(evaluate.main)
    assert exc.value.code == 2
    assert "1 predictions in short.jsonl but 5 references" in capsys.readouterr().err


def test_evaluate_checks_its_output_first(tmp_path, monkeypatch):
    """An --output_json under a file was a traceback after scoring."""
    ev = _load("evaluate")
    pred = tmp_path / "pred.jsonl"
    pred.write_text('{"response": "[(a,b,c)]"}\n', encoding="utf-8")
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--pred_file", str(pred), "--gold_file", str(pred),
                                      "--output_json", str(tmp_path / "afile" / "m.json")])
    with pytest.raises(UserError, match=r"^--output_json .*m\.json cannot be written: .*afile is a file"):
        ev.main()


def test_evaluate_never_writes_over_its_inputs(tmp_path, monkeypatch):
    """--output_json naming the reference file replaced the references with the metrics."""
    ev = _load("evaluate")
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"response": "[(a,b,c)]"}\n', encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--pred_file", str(gold), "--gold_file", str(gold),
                                      "--output_json", str(gold)])
    with pytest.raises(UserError, match=r"^--output_json and --gold_file name the same file"):
        ev.main()
    assert gold.read_text(encoding="utf-8") == '{"response": "[(a,b,c)]"}\n'
