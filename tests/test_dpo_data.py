"""Preference data (utils/dpo_data_process.py): readers, malformed-row reports, generation of
the rejected answers by a tiny model, skipping of rejected == chosen, resume, split."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from config import DpoDataConfig
from utils.cli import UserError
from utils.dpo_data_process import (Report, build, generate_answers, read_instruction_file, read_preference_file,
                                    split_pairs)

FIXTURES = Path(__file__).parent / "fixtures" / "dpo"



BELLE = [{"instruction": "把下面的句子改写得更礼貌。", "input": "给我倒杯水", "output": "请您帮我倒一杯水，好吗？"},
         {"instruction": "写一句问候语", "input": None, "output": "你好！"},  # a null input is no input
         {"instruction": "写一句问候语", "output": "早上好！"}]  # nor is an absent one
BELLE_PAIRS = [("把下面的句子改写得更礼貌。\n给我倒杯水", "请您帮我倒一杯水，好吗？"), ("写一句问候语", "你好！"),
               ("写一句问候语", "早上好！")]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_the_same_belle_record_is_the_same_prompt_in_every_reader(tmp_path, kind):
    """One reader and one joining rule (model.pairs): the cleaning stage's belle format, SFT's
    JSON training files (hf_seq2seq.load_pair_dataset), the DPO instruction reader and the
    generic pair reader turn an instruction + input record into the same prompt. DPO used to
    join with "，" (SFT data with a newline), refused a null input, and sft_train.py refused
    BELLE records outright."""
    import pandas as pd

    from model.hf_seq2seq import load_pair_dataset
    from model.pairs import BadRows, iter_pairs
    from utils.data_readers import read_pairs

    src = tmp_path / f"belle.{kind}"
    if kind == "jsonl":
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in BELLE), encoding="utf-8")
    elif kind == "json":
        src.write_text(json.dumps(BELLE, ensure_ascii=False), encoding="utf-8")
    else:
        pd.DataFrame(BELLE).to_parquet(src)
    bad = BadRows()
    assert list(iter_pairs(src, bad)) == BELLE_PAIRS and bad.count == 0
    assert list(read_pairs(src, "belle")) == BELLE_PAIRS  # the cleaning stage (SFT data)
    dpo = read_instruction_file(src, Report())
    assert [(r["prompt"], r["chosen"]) for r in dpo] == BELLE_PAIRS
    if kind != "parquet":  # sft_train.py's JSON files (its parquet files are the cleaning stage's output)
        ds = load_pair_dataset(src, "train")
        assert list(zip(ds["prompt"], ds["response"])) == BELLE_PAIRS and ds.column_names == ["prompt", "response"]


def test_alpaca_reader_joins_instruction_and_input():
    report = Report()
    rows = read_instruction_file(FIXTURES / "alpaca_gpt4_data_zh_sample.json", report)
    assert [r["prompt"] for r in rows] == ["保持健康的三个提示。", "将以下句子翻译成英文。\n今天天气很好", "三原色是什么？"]
    assert rows[1]["chosen"] == "The weather is nice today."
    assert rows[0]["chosen"].startswith("以下是保持健康的三个提示：\n\n1.")
    assert report.malformed.count == 0 and report.read == {str(FIXTURES / "alpaca_gpt4_data_zh_sample.json"): 3}


def test_huozi_reader_takes_reject_field_and_unescapes_newlines():
    report = Report()
    rows = read_preference_file(FIXTURES / "huozi_rlhf_data_sample.json", report, unescape=True)
    assert rows[0] == {"prompt": "如何学好数学？", "chosen": "多做练习，理解概念，\n及时复习错题。", "rejected": "数学很难。"}
    assert rows[1]["rejected"] == "不知道。" and len(rows) == 2


@pytest.mark.parametrize("name", ["rlhf_reward_single_round_sample.parquet", "rlhf_reward_single_round_sample.jsonl"])
def test_rlhf_reward_reader(name):
    report = Report()
    rows = read_preference_file(FIXTURES / name, report, max_rows=2)
    assert len(rows) == 2  # --max_rows caps each file
    assert rows[1] == {"prompt": "怎样煮出好吃的米饭？", "chosen": "米和水的比例大约一比一点二，浸泡半小时后再煮。",
                       "rejected": "放进锅里煮就行。"}


def test_malformed_records_are_reported_with_position(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}),
        "{not json",
        json.dumps({"prompt": "a", "chosen": "b"}),
        "",
        json.dumps({"prompt": "a", "chosen": None, "rejected": "c"}),
        json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"}),
        json.dumps(["a", "b", "c"]),
        json.dumps({"prompt": "x", "chosen": "y", "rejected": "z"}),
    ]) + "\n", encoding="utf-8")
    report = Report()
    rows = read_preference_file(jsonl, report)
    assert [r["prompt"] for r in rows] == ["a", "x"]
    bad = report.malformed.examples
    assert [(m.position, m.reason) for m in bad] == [
        ("line 2", bad[0].reason), ("line 3", "missing key: 'rejected'"),
        ("line 5", "null value: 'chosen'"), ("line 6", "not a string: 'chosen' is int"),
        ("line 7", "not a JSON object: list")]
    assert bad[0].reason.startswith("bad JSON")
    assert str(bad[1]) == f"{jsonl}:line 3: missing key: 'rejected'"
    assert report.read == {str(jsonl): 7} and report.malformed.count == 5

    # an absent or null input is no input, as in SFT data (utils.data_readers); a null output is malformed
    array = tmp_path / "instr.json"
    array.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"},
                                 {"instruction": "i", "input": None, "output": "o"},
                                 {"instruction": "i", "output": "o"},
                                 {"instruction": "i", "input": "x", "output": None}]), encoding="utf-8")
    report = Report()
    assert read_instruction_file(array, report) == [{"prompt": "i", "chosen": "o"}] * 3
    assert [(m.position, m.reason) for m in report.malformed.examples] == [("item 4", "null value: 'output'")]

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": ["p", None], "response": ["r", "r"]}), tmp_path / "instr.parquet")
    report = Report()
    assert read_instruction_file(tmp_path / "instr.parquet", report) == [{"prompt": "p", "chosen": "r"}]
    assert [(m.position, m.reason) for m in report.malformed.examples] == [("row 2", "null value: 'prompt'")]


def test_unreadable_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_preference_file(tmp_path / "missing.json", Report())
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"prompt\": ", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        read_preference_file(bad, Report())
    txt = tmp_path / "pairs.txt"
    txt.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=".json, .jsonl or .parquet"):
        read_preference_file(txt, Report())


def test_split_is_seeded_and_disjoint():
    rows = [{"prompt": str(i), "chosen": "c", "rejected": "r"} for i in range(50)]
    train, held = split_pairs(rows, 0.1, -1, seed=7)
    assert len(held) == 5 and len(train) == 45
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert split_pairs(rows, 0.1, -1, seed=7) == (train, held)
    assert split_pairs(rows, 0.1, -1, seed=8) != (train, held)
    assert len(split_pairs(rows[:3], 0.01, -1, 7)[1]) == 1  # a tiny set still holds one pair out
    assert len(split_pairs(rows, 0.5, 3, 7)[1]) == 3


# ---------------------------------------------------------------- generation with a tiny model

PROMPTS = ["今天天气怎么样", "推荐一本好书", "怎样学习英语", "这部手机好用吗", "北京有什么好玩的",
           "如何保持健康", "介绍一下长城", "周末做什么好", "怎么做红烧肉", "写一句诗"]


def _instruction_parquet(path: Path, chosen: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": PROMPTS, "response": chosen}), path)
    return path


@pytest.fixture(scope="module")
def model_answers(chatty_model_dir):
    """The tiny model's greedy answers to PROMPTS, batched as the builder batches them."""
    from model.chat_model import load_model, load_tokenizer

    model, tok = load_model(chatty_model_dir).eval(), load_tokenizer(chatty_model_dir)
    answers = []
    for i in range(0, len(PROMPTS), 4):
        answers += generate_answers(model, tok, PROMPTS[i:i + 4], 4, 6, 64, "greedy", 0)
    return answers


def _cfg(tmp_path, instruction_file, model_dir, **kw):
    return replace(DpoDataConfig(), instruction_file=str(instruction_file), sft_model_dir=str(model_dir),
                   train_file=str(tmp_path / "out" / "train.json"), eval_file=str(tmp_path / "out" / "eval.json"),
                   batch_size=4, max_new_tokens=6, max_seq_len=64, eval_rows=2, device="cpu", **kw)


def test_build_generates_rejected_and_skips_answers_equal_to_chosen(tmp_path, chatty_model_dir, model_answers):
    assert all(a.strip() for a in model_answers)
    chosen = [f"参考答案{i}" for i in range(len(PROMPTS))]
    chosen[1], chosen[6] = model_answers[1], " " + model_answers[6]  # the model already says these
    cfg = _cfg(tmp_path, _instruction_parquet(tmp_path / "instr.parquet", chosen), chatty_model_dir,
               preference_files=str(FIXTURES / "huozi_rlhf_data_sample.json"))
    report = build(cfg)
    assert report.dropped == {"rejected equals chosen": 2}
    assert report.generated == len(PROMPTS) and report.train_rows == 8 + 2 - 2 and report.eval_rows == 2
    train = json.loads(Path(cfg.train_file).read_text(encoding="utf-8"))
    held = json.loads(Path(cfg.eval_file).read_text(encoding="utf-8"))
    pairs = {r["prompt"]: r for r in train + held}
    assert len(pairs) == 10 and PROMPTS[1] not in pairs and PROMPTS[6] not in pairs
    for i in (0, 2, 9):
        assert pairs[PROMPTS[i]] == {"prompt": PROMPTS[i], "chosen": chosen[i], "rejected": model_answers[i]}
    assert pairs["推荐一本入门的历史书。"]["rejected"] == "不知道。"
    import pandas as pd
    assert pd.read_parquet(Path(cfg.train_file).with_suffix(".parquet")).to_dict("records") == train
    assert not Path(cfg.train_file + ".rejected.partial.jsonl").exists()


def test_interrupted_generation_resumes_to_the_same_output(tmp_path, chatty_model_dir):
    instr = _instruction_parquet(tmp_path / "instr.parquet", [f"参考答案{i}" for i in range(len(PROMPTS))])
    full = _cfg(tmp_path / "a", instr, chatty_model_dir)
    build(full)

    cfg = _cfg(tmp_path / "b", instr, chatty_model_dir)
    calls = []

    def dies_on_second_batch(*args):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate_answers(*args)

    with pytest.raises(KeyboardInterrupt):
        build(cfg, generate=dies_on_second_batch)
    partial = Path(cfg.train_file + ".rejected.partial.jsonl")
    assert len(partial.read_text(encoding="utf-8").splitlines()) == 1 + 4  # header + the first batch
    assert not Path(cfg.train_file).exists()
    with open(partial, "a", encoding="utf-8") as fh:
        fh.write('{"i": 4, "rejec')  # a line torn by the kill

    calls.clear()
    report = build(cfg, generate=lambda *a: calls.append(a[2]) or generate_answers(*a))
    assert report.resumed_from == 4 and calls == [PROMPTS[4:8], PROMPTS[8:]]
    for a, b in ((full.train_file, cfg.train_file), (full.eval_file, cfg.eval_file)):
        assert Path(a).read_text(encoding="utf-8") == Path(b).read_text(encoding="utf-8")


def test_partial_file_from_other_settings_is_refused(tmp_path, chatty_model_dir):
    instr = _instruction_parquet(tmp_path / "instr.parquet", [f"参考答案{i}" for i in range(len(PROMPTS))])
    cfg = _cfg(tmp_path, instr, chatty_model_dir)
    partial = Path(cfg.train_file + ".rejected.partial.jsonl")
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"fingerprint": {"other": 1}}) + "\n" + json.dumps({"i": 0, "rejected": "x"}) + "\n")
    with pytest.raises(UserError, match="--restart True"):
        build(cfg)
    report = build(replace(cfg, restart=True, max_rows=4))
    assert report.generated == 4 and report.resumed_from == 0


def test_nothing_left_is_an_error_and_writes_nothing(tmp_path, capsys):
    only_long = tmp_path / "pairs.json"
    only_long.write_text(json.dumps([{"prompt": "p", "chosen": "长" * 20, "rejected": "r"},
                                     {"prompt": "p", "chosen": "same", "rejected": " same "}]), encoding="utf-8")
    cfg = replace(DpoDataConfig(), instruction_file="", preference_files=str(only_long), max_len=10,
                  train_file=str(tmp_path / "t.json"), eval_file=str(tmp_path / "e.json"))
    with pytest.raises(UserError, match="no preference pairs left"):
        build(cfg)
    out = capsys.readouterr().out
    assert "dropped (longer than 10 characters): 1" in out and "dropped (rejected equals chosen): 1" in out
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(UserError, match="nothing to read"):
        build(replace(cfg, preference_files=""))


def test_empty_rejected_answer_is_kept_empty_prompt_is_not():
    from utils.dpo_data_process import Report, filter_pairs

    report = Report()
    rows = [{"prompt": "问", "chosen": "答", "rejected": ""},
            {"prompt": " ", "chosen": "答", "rejected": "错"},
            {"prompt": "问", "chosen": "", "rejected": "错"}]
    assert filter_pairs(rows, 100, report) == [{"prompt": "问", "chosen": "答", "rejected": ""}]


def test_a_second_build_of_the_same_output_is_refused(tmp_path):
    """Two runs writing one --train_file would append to one partial file."""
    from conftest import another_process_holding_the_lock

    from config import DpoDataConfig
    from utils.cli import UserError
    from utils.dpo_data_process import build

    train = tmp_path / "dpo_train.json"
    cfg = DpoDataConfig(instruction_file=str(tmp_path / "none.parquet"), train_file=str(train),
                        eval_file=str(tmp_path / "dpo_eval.json"))
    with another_process_holding_the_lock(train) as pid:
        with pytest.raises(UserError, match=f"another run \\(process {pid}\\) .* choose another --train_file"):
            build(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_instruction_rows_and_pairs_are_dropped_under_one_name_per_reason(tmp_path, chatty_model_dir):
    """An empty chosen answer is one reason whether it comes from the instruction file (dropped
    before generation) or from a preference file; it was 'empty text' for the former."""
    chosen = [f"参考答案{i}" for i in range(len(PROMPTS))]
    chosen[0], chosen[1] = "  ", "长" * 40
    prefs = tmp_path / "prefs.json"
    prefs.write_text(json.dumps([{"prompt": "p", "chosen": "", "rejected": "r"},
                                 {"prompt": "p", "chosen": "c", "rejected": "长" * 40}]), encoding="utf-8")
    cfg = _cfg(tmp_path, _instruction_parquet(tmp_path / "instr.parquet", chosen), chatty_model_dir,
               preference_files=str(prefs), max_len=30)
    report = build(cfg, generate=lambda model, tok, prompts, *a, **k: ["答" for _ in prompts])
    assert report.generated == len(PROMPTS) - 2
    assert report.dropped == {"empty prompt or chosen answer": 2, "longer than 30 characters": 2}


def test_outputs_never_replace_an_input_or_a_parquet_file_they_did_not_write(tmp_path, chatty_model_dir):
    """The .parquet copy beside --train_file replaced whatever file had that name (a user's
    data, or the instruction file itself: --instruction_file d.parquet --train_file d.json), and
    --train_file could name an input. Both are refused before anything is read or generated."""
    instr = _instruction_parquet(tmp_path / "d.parquet", [f"参考答案{i}" for i in range(len(PROMPTS))])
    before = instr.read_bytes()
    answer = lambda model, tok, prompts, *a, **k: ["答" for _ in prompts]  # noqa: E731
    cfg = replace(_cfg(tmp_path, instr, chatty_model_dir), train_file=str(tmp_path / "d.json"))
    with pytest.raises(UserError, match=r"^the \.parquet copy of --train_file and --instruction_file name the same "
                                        r"file \(.*d\.parquet\): give each its own$"):
        build(cfg, generate=answer)
    prefs = tmp_path / "prefs.json"
    prefs.write_text(json.dumps([{"prompt": "p", "chosen": "c", "rejected": "r"}]), encoding="utf-8")
    with pytest.raises(UserError, match=r"^--train_file and --preference_files name the same file "
                                        r"\(.*prefs\.json\): give each its own$"):
        build(replace(cfg, train_file=str(prefs), preference_files=str(prefs)), generate=answer)
    with pytest.raises(UserError, match=r"^--eval_file and --train_file name the same file"):
        build(replace(cfg, train_file=str(tmp_path / "t.json"), eval_file=str(tmp_path / "t.json")), generate=answer)
    users = tmp_path / "mine.parquet"
    users.write_bytes(b"a user's own file")
    with pytest.raises(UserError, match=r"^the \.parquet copy of --eval_file would replace .*mine\.parquet, which "
                                        r"this project did not write: move it away, choose another --eval_file, "
                                        r"or --write_parquet False$"):
        build(replace(cfg, train_file=str(tmp_path / "t.json"), eval_file=str(tmp_path / "mine.json")),
              generate=answer)
    assert instr.read_bytes() == before and users.read_bytes() == b"a user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet", "mine.parquet", "prefs.json"]
    # its own parquet copies are replaced by a second build
    ok = replace(cfg, train_file=str(tmp_path / "t.json"), eval_file=str(tmp_path / "e.json"))
    for _ in range(2):
        build(ok, generate=answer)
    assert build(replace(ok, write_parquet=False, eval_file=str(tmp_path / "mine.json")), generate=answer)
    assert users.read_bytes() == b"a user's own file"
    # a copy written before the marker existed holds the pairs of its JSON: replacing it loses nothing
    import pyarrow.parquet as pq
    copy = tmp_path / "t.parquet"
    pq.write_table(pq.read_table(copy).replace_schema_metadata(None), copy)
    build(ok, generate=answer)
    pq.write_table(pq.read_table(copy).replace_schema_metadata(None).slice(1), copy)  # now not the JSON's pairs
    with pytest.raises(UserError, match=r"would replace .*t\.parquet, which this project did not write"):
        build(ok, generate=answer)


def test_the_partial_file_is_never_a_file_it_did_not_write(tmp_path, chatty_model_dir):
    """--partial_file naming another file (the instruction JSON, say) was overwritten: a first
    line that did not parse counted as a torn header, "start over"; --restart True overwrote
    any file. Now only a log of this command, or an empty one, is reused or restarted."""
    instr = tmp_path / "alpaca.json"
    instr.write_text(json.dumps([{"instruction": p, "input": "", "output": f"参考答案{i}"}
                                 for i, p in enumerate(PROMPTS)], ensure_ascii=False, indent=1), encoding="utf-8")
    before = instr.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", encoding="utf-8")
    answer = lambda model, tok, prompts, *a, **k: ["答" for _ in prompts]  # noqa: E731
    cfg = _cfg(tmp_path, instr, chatty_model_dir)
    with pytest.raises(UserError, match=r"^--partial_file and --instruction_file name the same file"):
        build(replace(cfg, partial_file=str(instr)), generate=answer)
    for restart in (False, True):
        with pytest.raises(UserError, match=r"^--partial_file .*notes\.txt is not a generation log of this command"):
            build(replace(cfg, partial_file=str(notes), restart=restart), generate=answer)
    assert instr.read_bytes() == before and notes.read_text(encoding="utf-8") == "my notes\n"
    # its own log, torn in its header by a kill, is started over
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b'{"finger')
    assert build(replace(cfg, partial_file=str(torn)), generate=answer).generated == len(PROMPTS)
