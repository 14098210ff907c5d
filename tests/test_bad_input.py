"""Bad input gets a one-line error (exit 2) or a located malformed row, never a traceback or
silently altered data: invalid UTF-8, impossible settings, unwritable outputs, damaged models.

Scripts run through their real entry points: `main(argv)` inside `run_cli` (as
`python script.py` does), or a subprocess where the whole process matters.
"""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from utils.cli import UserError, run_cli

GOOD = {"prompt": "今天天气怎么样", "response": "今天是晴天，适合出门散步。"}
# A row whose prompt holds GBK bytes (你好) in an otherwise UTF-8 JSON-lines file.
GBK_ROW = (b'{"prompt": "' + "你好".encode("gbk") + b'", "response": "' + "很好，谢谢你的关心。".encode()
           + b'"}\n')


def one_line_error(capsys, main, argv) -> str:
    """Run `main(argv)` as a script runs it; assert exit 2 and one stderr line; return that line."""
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def run_script(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ invalid UTF-8

def _bytes_file(path: Path, *chunks: bytes) -> Path:
    path.write_bytes(b"".join(chunks))
    return path


def _line(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


def test_clean_counts_and_locates_invalid_utf8_rows(tmp_path):
    src = _bytes_file(tmp_path / "raw.jsonl", _line(GOOD), GBK_ROW, _line(GOOD | {"prompt": "明天呢"}))
    out = tmp_path / "clean.parquet"
    proc = run_script("-m", "utils.raw_data_process", "clean", "--input", src, "--output", out, "--num_workers", "1")
    assert proc.returncode == 0, proc.stderr
    offset = len(_line(GOOD)) + len(b'{"prompt": "')
    assert "malformed rows: 1 (not UTF-8 1)" in proc.stdout
    assert f"{src}:line 2: not UTF-8: byte 0xc4 at byte offset {offset}" in proc.stdout
    rows = pq.read_table(out).to_pylist()
    assert [r["prompt"] for r in rows] == ["今天天气怎么样", "明天呢"]
    assert not any("\ufffd" in r["prompt"] + r["response"] for r in rows)


def test_csv_and_wiki_readers_drop_only_the_row_with_invalid_utf8(tmp_path):
    from utils.data_readers import BadRows, read_pairs

    csv_file = _bytes_file(tmp_path / "raw.csv", "\ufeffprompt,response\n问题一,回答一\n".encode(),
                           b'"\xc4\xe3\n', "第二行\",回答二\n问题三,回答三\n".encode())
    bad = BadRows()
    assert list(read_pairs(csv_file, bad=bad)) == [("问题一", "回答一"), ("问题三", "回答三")]
    assert bad.count == 1 and str(bad.examples[0]).startswith(f"{csv_file}:line 3: not UTF-8: byte 0xc4")

    wiki = _bytes_file(tmp_path / "wiki.txt", '<doc id="1" title="北京">\n北京\n北京是中国的首都。\n</doc>\n'.encode(),
                       '<doc id="2" title="上海">\n上海\n'.encode(), "上海是城市。".encode("gbk"),
                       b"\n</doc>\n")
    bad = BadRows()
    assert [p[1] for p in read_pairs(wiki, bad=bad)] == ["北京是中国的首都。"]
    assert bad.count == 1 and "not UTF-8" in str(bad.examples[0]) and "(line 7)" in str(bad.examples[0])


def test_json_array_not_utf8_is_one_line_error(tmp_path, capsys):
    from utils.raw_data_process import main

    src = _bytes_file(tmp_path / "raw.json", b'[{"prompt": "ok", "response": "\xff"}]')
    out = tmp_path / "clean.parquet"
    line = one_line_error(capsys, main, ["clean", "--input", str(src), "--output", str(out)])
    assert f"{src} is not UTF-8 text: line 1, byte 0xff at byte offset 31" in line
    assert not out.exists()


def test_a_gbk_json_lines_file_is_said_to_be_gbk_not_of_unknown_format(tmp_path, capsys):
    """Every line of a GBK file fails to decode, so format detection found no record and said
    "cannot tell the format of ...; pass --input_format", which sends the user the wrong way."""
    from utils.raw_data_process import main

    src = _bytes_file(tmp_path / "raw.jsonl", *[(json.dumps(GOOD, ensure_ascii=False) + "\n").encode("gbk")] * 3)
    line = one_line_error(capsys, main, ["clean", "--input", str(src), "--output", str(tmp_path / "out.parquet")])
    assert f"input file {src} is not UTF-8 text: line 1, byte 0x" in line and "iconv -f GBK" in line, line


def test_dpo_and_eval_readers_reject_invalid_utf8(tmp_path):
    from model.pairs import read_rows
    from utils.dpo_data_process import Report, read_preference_file

    pref = {"prompt": "你好", "chosen": "你好，有什么可以帮你？", "rejected": "不知道"}
    src = _bytes_file(tmp_path / "pref.jsonl", _line(pref), GBK_ROW.replace(b'"response"', b'"chosen": "x", "rejected"'))
    report = Report()
    assert read_preference_file(src, report) == [pref]
    assert [(m.position, m.reason.split(":")[0]) for m in report.malformed.examples] == [("line 2", "not UTF-8")]
    pred = _bytes_file(tmp_path / "pred.jsonl", _line(GOOD), GBK_ROW)
    with pytest.raises(UserError, match=r"^predictions .*pred\.jsonl line 2: not UTF-8: byte 0xc4 at byte offset .*; "
                                        r"save it as UTF-8"):
        read_rows(pred, ("response",), "predictions")


# ------------------------------------------------------------------ impossible settings

def _bad_values(rule) -> list[str]:
    """Values just outside what `rule.text` says is valid (and NaN / infinity for numbers)."""
    import re

    text = rule.text
    if m := re.match(r"-1 \(.*\) or an integer >= (\d+)", text):
        return ["0", "-2"] if m.group(1) == "1" else [str(int(m.group(1)) - 1)]
    if m := re.match(r"an integer >= (-?\d+)", text):
        return [str(int(m.group(1)) - 1)]
    if m := re.match(r"an integer in \[(\d+), (\d+)\]", text):
        return [str(int(m.group(1)) - 1), str(int(m.group(2)) + 1)]
    if text == "a finite number > 0":
        return ["0", "-1e-5", "nan", "inf"]
    if text == "a finite number >= 0":
        return ["-1e-5", "nan", "inf"]
    if m := re.match(r"a number in ([\[(])0, 1([\])])", text):
        return ["-0.1", "1.5", "nan"] + (["0"] if m.group(1) == "(" else []) + (["1"] if m.group(2) == ")" else [])
    return ["bogus"]  # one of a list of names


def _cases():
    import config
    from settings import Settings

    for cls in vars(config).values():
        if isinstance(cls, type) and issubclass(cls, Settings) and cls is not Settings:
            for name, rule in cls.rules.items():
                for bad in _bad_values(rule):
                    yield pytest.param(cls, name, bad, id=f"{cls.__name__}.{name}={bad}")


@pytest.mark.parametrize("cls, name, bad", list(_cases()))
def test_every_setting_out_of_range_is_one_line_error(cls, name, bad):
    from utils.cli import parse_config

    with pytest.raises(UserError) as exc:
        parse_config(cls, [f"--{name}={bad}"])
    message = str(exc.value)
    assert message.startswith(f"--{name} must be ") and ", got " in message and "\n" not in message


def test_every_numeric_or_choice_setting_has_a_rule():
    import dataclasses

    import config
    from settings import Settings

    classes = [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, Settings) and c is not Settings]
    assert len(classes) == 6
    for cls in classes:
        assert set(cls.rules) <= {f.name for f in dataclasses.fields(cls)}, cls  # no rule for a missing field
        for f in dataclasses.fields(cls):
            if f.type in (int, float):
                assert f.name in cls.rules, f"{cls.__name__}.{f.name} has no valid range in config.py"
    for cls, choices in ((config.TrainConfig, ("mixed_precision", "optimizer", "streaming")),
                         (config.DataProcessConfig, ("input_format", "response_overflow", "pretrain_objective")),
                         (config.InferConfig, ("device", "search_type", "mixed_precision", "log_level")),
                         (config.DpoDataConfig, ("device", "search_type"))):
        assert set(choices) <= cls.rules.keys()


def test_range_boundaries_sentinels_and_cross_checks():
    from dataclasses import replace

    from config import DataProcessConfig, DpoConfig, InferConfig, SFTconfig, TrainConfig
    from model.modeling_chat_model import SEARCH_TYPES

    # the smallest valid values and the documented sentinels are accepted
    DataProcessConfig(ngram=1, num_perm=2, bins=1, num_workers=0, max_rows=-1, min_prompt_len=0,
                      train_ratio=1.0, valid_ratio=0.0, test_ratio=0.0)
    TrainConfig(max_steps=-1, eval_max_samples=-1, warmup_steps=0, seed=0, learn_rate=1e-12)
    SFTconfig(save_total_limit=0, max_steps=1)
    DpoConfig(lora_r=1, lora_dropout=0.0, max_eval_pairs=-1, optim="adamw_torch")
    InferConfig(device="cuda:1", port=65535)
    # programmatic construction and dataclasses.replace are checked too
    with pytest.raises(UserError, match=r"^--lora_r must be an integer >= 1, got 0$"):
        replace(DpoConfig(), lora_r=0)
    with pytest.raises(UserError, match=r"must add up to 1, got 0\.8 \+ 0\.0025 \+ 0\.0875 = 0\.89$"):
        DataProcessConfig(train_ratio=0.8)
    with pytest.raises(UserError, match=r"--min_response_len \(9\) must not exceed --max_response_len \(8\)"):
        DataProcessConfig(min_response_len=9, max_response_len=8)
    with pytest.raises(UserError, match=r"--demo_valid_ratio \+ --demo_test_ratio must be < 1"):
        DataProcessConfig(demo_valid_ratio=0.5, demo_test_ratio=0.5)
    DpoConfig(lora_target_modules="q, v,wo")
    with pytest.raises(UserError, match=r"--lora_target_modules must be a comma-separated list of one or more of: q, "):
        DpoConfig(lora_target_modules=" , ")
    with pytest.raises(UserError, match=r"--epochs must be an integer >= 1, got True"):
        TrainConfig(epochs=True)  # a bool is not a count
    import config
    assert config.SEARCH_TYPES == SEARCH_TYPES  # the model file ships its own copy


@pytest.mark.parametrize("argv, message", [
    (["dedup", "--ngram", "0"], "--ngram must be an integer >= 1, got 0"),
    (["dedup", "--ngram", "-3"], "--ngram must be an integer >= 1, got -3"),
    (["dedup", "--num_perm", "0"], "--num_perm must be an integer >= 2, got 0"),
    (["dedup", "--num_perm", "8"], "--num_perm 8 is too few for --dedup_threshold 0.85"),
    (["stats", "--bins", "0"], "--bins must be an integer >= 1, got 0"),
    (["split", "--train_ratio", "2"], "--train_ratio must be a number in [0, 1], got 2.0"),
    (["clean", "--response_overflow", "wrap"], "--response_overflow must be one of: cut, drop, got 'wrap'"),
])
def test_data_pipeline_refuses_impossible_settings_and_writes_nothing(tmp_path, capsys, argv, message):
    from utils.parquet_io import write_pairs
    from utils.raw_data_process import main

    src = write_pairs(tmp_path / "in.parquet", [(f"第{i}个问题是什么", f"这是第{i}个不同的回答。") for i in range(16)]).path
    out = tmp_path / ("lengths.png" if argv[0] == "stats" else "out.parquet")
    line = one_line_error(capsys, main, argv + ["--input", str(src), "--output", str(out),
                                                "--output_dir", str(tmp_path / "split")])
    assert line == f"error: {message}" or line.startswith(f"error: {message} (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_training_scripts_refuse_impossible_settings(tmp_path, capsys, monkeypatch):
    import dpo_train
    import sft_train
    from utils import dpo_data_process

    line = one_line_error(capsys, sft_train.main, ["--learning_rate", "nan", "--output_dir", str(tmp_path / "sft")])
    assert line == "error: --learning_rate must be a finite number > 0, got nan"
    line = one_line_error(capsys, dpo_data_process.main, ["--eval_ratio", "2", "--train_file", str(tmp_path / "d.json")])
    assert line == "error: --eval_ratio must be a number in [0, 1), got 2.0"
    monkeypatch.setattr(sys, "argv", ["dpo_train.py", "train", "--use_lora", "True", "--lora_r", "0",
                                      "--output_dir", str(tmp_path / "dpo")])
    line = one_line_error(capsys, lambda argv: dpo_train.main(), None)
    assert line == "error: --lora_r must be an integer >= 1, got 0"
    assert list(tmp_path.iterdir()) == []


def test_bad_setting_through_a_real_process():
    proc = run_script("-m", "utils.raw_data_process", "dedup", "--ngram", "0", "--input", "x.parquet", "--output", "y")
    assert assert_one_line(proc) == "error: --ngram must be an integer >= 1, got 0"


# ------------------------------------------------------------------ outputs that cannot be written

def _script_main(name: str):
    """`main` of a root script taking argv (the ones that read sys.argv get it set)."""
    import importlib

    module = importlib.import_module(name)

    def main(argv):
        old = sys.argv
        sys.argv = [f"{name}.py", *argv]
        try:
            return module.main()
        finally:
            sys.argv = old
    return main


UNWRITABLE = [
    ("utils.raw_data_process", ["clean", "--output", "{out}/x.parquet"], "--output"),
    ("utils.raw_data_process", ["dedup", "--output", "{out}/x.parquet"], "--output"),
    ("utils.raw_data_process", ["to_text", "--output", "{out}/x.txt"], "--output"),
    ("utils.raw_data_process", ["stats", "--output", "{out}/x.png"], "--output"),
    ("utils.raw_data_process", ["split", "--output_dir", "{out}/splits"], "--output_dir"),
    ("train", ["train", "--output_dir", "{out}/pre"], "--output_dir"),
    ("pre_train", ["--output_dir", "{out}/pre"], "--output_dir"),
    ("sft_train", ["--output_dir", "{out}/sft"], "--output_dir"),
    ("dpo_train", ["train", "--output_dir", "{out}/dpo"], "--output_dir"),
    ("dpo_train", ["merge", "--merged_output_dir", "{out}/merged"], "--merged_output_dir"),
    ("dpo_train", ["eval", "--eval_output_file", "{out}/e.json"], "--eval_output_file"),
    ("utils.dpo_data_process", ["--train_file", "{out}/d.json"], "--train_file"),
    ("train_tokenizer", ["--output_dir", "{out}/tok"], "--output_dir"),
    ("eval.eval_tasks", ["--task", "bleu", "--test_file", "t.parquet", "--output_json", "{out}/m.json"], "--output_json"),
    ("eval.eval_tasks", ["--task", "bleu", "--test_file", "t.parquet", "--predictions_file", "{out}/p.jsonl"],
     "--predictions_file"),
    ("eval.c_eval", ["--output_dir", "{out}/ceval"], "--output_dir"),
]


@pytest.mark.parametrize("where", ["parent_is_a_file", "proc"])
@pytest.mark.parametrize("module, argv, flag", UNWRITABLE, ids=[f"{m}-{a[0]}" for m, a, _ in UNWRITABLE])
def test_unwritable_output_is_one_line_error(tmp_path, capsys, where, module, argv, flag):
    from utils.parquet_io import write_pairs

    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    src = write_pairs(tmp_path / "in.parquet", [("你好吗", "我很好，谢谢。")]).path
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory", encoding="utf-8")
    out = blocker if where == "parent_is_a_file" else Path("/proc")
    argv = [a.format(out=out) for a in argv]
    main = (lambda a: __import__(module, fromlist=["main"]).main(a)) if module.startswith("utils.") else \
        _script_main(module)
    if module == "utils.raw_data_process":
        argv += ["--input", str(src)]
    line = one_line_error(capsys, main, argv)
    expected_why = f"{blocker} is a file, not a directory" if where == "parent_is_a_file" else "cannot create files in /proc"
    assert line.startswith(f"error: {flag} {out}/") and f"cannot be written: {expected_why}" in line
    assert blocker.read_text(encoding="utf-8") == "a file, not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "notes.txt"]


# ------------------------------------------------------------------ damaged models

def _damaged_copy(src: Path, dst: Path, name: str, damage) -> Path:
    import shutil

    shutil.copytree(src, dst)
    p = dst / name
    damage(p)
    return dst


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated_safetensors": ("model.safetensors", _truncate, "model.safetensors is damaged or truncated"),
    "safetensors_header_only": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:200]),
                                "model.safetensors is damaged or truncated"),
    "broken_config_json": ("config.json", lambda p: p.write_text('{"d_model": 64,', encoding="utf-8"),
                           "model config file is not valid JSON: {dir}/config.json"),
    "config_json_not_object": ("config.json", lambda p: p.write_text("[1, 2]", encoding="utf-8"),
                               "model config file is not a JSON object of settings: {dir}/config.json"),
    "broken_tokenizer_json": ("tokenizer.json", _truncate, "cannot read the tokenizer in {dir}"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("script", ["cli_demo", "api_demo"])
def test_damaged_model_is_one_line_error(tiny_model_dir, tmp_path, capsys, script, damage):
    name, fn, message = DAMAGE[damage]
    model_dir = _damaged_copy(tiny_model_dir, tmp_path / "model", name, fn)
    line = one_line_error(capsys, _script_main(script), ["--model_dir", str(model_dir), "--port", "1"])
    assert message.format(dir=model_dir) in line


def test_damaged_weight_files_given_directly(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from model.chat_model import load_model

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), legacy / "chat_small_t5.bin")
    _truncate(legacy / "chat_small_t5.bin")
    with pytest.raises(UserError, match=r"chat_small_t5\.bin is damaged or truncated \(.*\): save, copy or download"):
        load_model(legacy / "chat_small_t5.bin")
    (legacy / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(UserError, match=r"model\.safetensors is damaged or truncated"):
        load_model(legacy / "model.safetensors")


def test_damaged_model_through_a_real_process(tiny_model_dir, tmp_path):
    model_dir = _damaged_copy(tiny_model_dir, tmp_path / "model", "model.safetensors", _truncate)
    proc = subprocess.run([sys.executable, str(ROOT / "cli_demo.py"), "--model_dir", str(model_dir)], input="exit\n",
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert assert_one_line(proc).startswith(f"error: {model_dir}/model.safetensors is damaged or truncated (")


def test_dpo_eval_names_a_missing_model_first(tmp_path, capsys):
    line = one_line_error(capsys, _script_main("dpo_train"),
                          ["eval", "--model", str(tmp_path / "nonexistent"), "--dpo_eval_file", str(tmp_path / "e.json"),
                           "--sft_model_file", str(tmp_path / "sft"), "--tokenizer_dir", str(tmp_path / "tok")])
    assert line.startswith(f"error: policy model not found: {tmp_path / 'nonexistent'} (--model: a model directory")


@pytest.mark.parametrize("command, name, message", [
    ("clean", "out.json", "clean writes parquet: --output must end in .parquet, got "),
    ("dedup", "out.jsonl", "dedup writes parquet: --output must end in .parquet, got "),
    ("denoise", "out", "denoise writes parquet: --output must end in .parquet, got "),
    ("stats", "lengths.jpg", "stats writes a PNG image: --output must end in .png, got "),
    ("to_text", "corpus.parquet", "to_text writes plain text: --output must not end in .parquet, got "),
])
def test_an_output_named_for_another_format_is_refused(tmp_path, capsys, command, name, message):
    """`clean --output x.json` wrote parquet bytes into x.json (which the next stage then read as
    JSON and called damaged); stats wrote a PNG into lengths.jpg."""
    from utils.raw_data_process import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "今天天气怎么样", "response": "晴天，适合出门散步。"}, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    line = one_line_error(capsys, main, [command, "--input", str(src), "--output", str(tmp_path / name)])
    assert line == f"error: {message}{tmp_path / name}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_the_triple_data_process_writes_only_parquet(tmp_path, capsys, monkeypatch):
    """--output_file naming the input JSON replaced it with parquet bytes under its .json name."""
    import importlib.util

    script = ROOT / "finetune_examples" / "info_extract" / "data_process.py"
    spec = importlib.util.spec_from_file_location("duie_data_process", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sample = script.parent / "sample_duie.json"
    src = tmp_path / "duie.json"
    src.write_bytes(sample.read_bytes())
    monkeypatch.setattr(sys, "argv", [str(script), "--input_file", str(src), "--output_file", str(src)])
    line = one_line_error(capsys, lambda argv: module.main(), None)
    assert line == f"error: --output_file must end in .parquet (the rows are written as parquet), got {src}"
    assert src.read_bytes() == sample.read_bytes()
