"""model/pairs.py, the one reader of prompt/response files: what each stage gets from a file
with malformed rows (SFT's JSON, DPO's pairs, evaluation's references, training parquet).
The same-prompt-in-every-reader test is in test_dpo_data.py."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.pairs import load_preference_pairs, read_rows
from utils.cli import UserError


def _jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def test_sft_json_skips_and_reports_malformed_records(tmp_path, capsys):
    """sft_train.py's JSON files are read like DPO's and the cleaning stage's: a malformed record
    is reported with its line and skipped (a null used to stop the run, a BELLE record too)."""
    from model.hf_seq2seq import load_pair_dataset

    src = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "问", "response": "答"}, '{"prompt": ', {"prompt": None, "response": "x"},
                                          {"instruction": "改写", "input": "句子", "output": "新句子"}])
    ds = load_pair_dataset(src, "train")
    assert list(zip(ds["prompt"], ds["response"])) == [("问", "答"), ("改写\n句子", "新句子")]
    err = capsys.readouterr().err
    assert "warning: skipped malformed rows: 2 (bad JSON 1, null value 1)" in err
    assert f"{src}:line 3: null value: 'prompt'" in err


def test_training_parquet_with_a_null_stops_naming_the_row(tmp_path):
    from model.hf_seq2seq import load_pair_dataset

    pq.write_table(pa.table({"prompt": ["a", "b", None], "response": ["x", "y", "z"]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"^train file .*n\.parquet: 1 rows have a null 'prompt' \(first: row 3\)$"):
        load_pair_dataset(tmp_path / "n.parquet", "train")


def test_preference_parquet_reads_its_columns_and_the_reject_alias(tmp_path):
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"], "reject": ["r"], "extra": [1]}), tmp_path / "a.parquet")
    assert load_preference_pairs(tmp_path / "a.parquet") == [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"]}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match=r"b\.parquet: parquet file has no rejected column \(columns: prompt, chosen\)"):
        load_preference_pairs(tmp_path / "b.parquet")


def test_preference_pairs_that_teach_no_preference_are_skipped_and_reported(tmp_path, capsys):
    """dpo_train.py trained on pairs whose rejected answer is the chosen one (zero gradient, and
    a tie in preference accuracy) and on empty chosen answers; they are skipped as the DPO data
    builder drops them (model.pairs.preference_problem), an empty rejected answer is kept."""
    src = _jsonl(tmp_path / "dpo.jsonl", [{"prompt": "问", "chosen": "答，好", "rejected": "不知道"},
                                          {"prompt": "问", "chosen": "答，好", "rejected": " 答,好"},  # NFKC-equal
                                          {"prompt": "问", "chosen": "  ", "rejected": "x"},
                                          {"prompt": "", "chosen": "答", "rejected": "x"},
                                          {"prompt": "问", "chosen": "答", "rejected": ""}])
    assert load_preference_pairs(src) == [{"prompt": "问", "chosen": "答，好", "rejected": "不知道"},
                                          {"prompt": "问", "chosen": "答", "rejected": ""}]
    err = capsys.readouterr().err
    assert "rejected equals chosen 1" in err and "empty prompt or chosen answer 2" in err, err
    assert f"{src}:line 2: rejected equals chosen" in err


def test_evaluation_rows_are_whole_or_one_line_error(tmp_path):
    """The references and predictions of an evaluation pair up row by row: nothing is skipped."""
    good = _jsonl(tmp_path / "pred.jsonl", [{"response": "a", "id": 1}, {"response": None}])
    assert read_rows(good, ("response",), "predictions", null_is_empty=True) == [{"response": "a", "id": 1},
                                                                                 {"response": ""}]
    array = tmp_path / "pred.json"
    array.write_text(json.dumps([{"response": "a"}]), encoding="utf-8")
    assert read_rows(array, ("response",), "predictions") == [{"response": "a"}]
    pq.write_table(pa.table({"prompt": ["p"], "response": ["r"], "n": [1]}), tmp_path / "ref.parquet")
    assert read_rows(tmp_path / "ref.parquet", ("prompt", "response"), "test file") == [{"prompt": "p", "response": "r"}]
    # a test file's null prompt or reference was scored as "" (an empty question, an empty answer)
    pq.write_table(pa.table({"prompt": ["p", None], "response": ["r", "x"]}), tmp_path / "null.parquet")
    with pytest.raises(UserError, match=r"^test file .*null\.parquet row 2: null value: 'prompt'$"):
        read_rows(tmp_path / "null.parquet", ("prompt", "response"), "test file")
    for lines, why in [([{"response": "a"}, {"answer": "b"}], "line 2: missing key: 'response'"),
                       ([{"response": 3}], "line 1: not a string: 'response' is int"),
                       ([{"response": "a"}, "[1]"], "line 2: not a JSON object: list"),
                       (['{"response": '], "line 1: bad JSON")]:
        bad = _jsonl(tmp_path / "bad.jsonl", lines)
        with pytest.raises(UserError) as err:
            read_rows(bad, ("response",), "predictions")
        assert str(err.value).startswith(f"predictions {bad} {why}"), str(err.value)
    empty = _jsonl(tmp_path / "blank.jsonl", [" "])
    with pytest.raises(UserError, match="predictions has no rows"):
        read_rows(empty, ("response",), "predictions")
    # a CSV (the cleaning stage reads them) was parsed as JSON lines: "line 1: bad JSON"
    (tmp_path / "test.csv").write_text("prompt,response\n问,答\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^test file must be \.json, \.jsonl or \.parquet: .*test\.csv$"):
        read_rows(tmp_path / "test.csv", ("prompt", "response"), "test file")
