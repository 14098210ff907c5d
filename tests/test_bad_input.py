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
GBK_ROW = b'{"prompt": "' + "你好".encode("gbk") + b'", "response": "' + "很好，谢谢你的关心。".encode() + b'"}\n'


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
    assert bad.count == 1 and bad.examples[0].startswith(f"{csv_file}:line 3: not UTF-8: byte 0xc4")

    wiki = _bytes_file(tmp_path / "wiki.txt", '<doc id="1" title="北京">\n北京\n北京是中国的首都。\n</doc>\n'.encode(),
                       '<doc id="2" title="上海">\n上海\n'.encode(), "上海是城市。".encode("gbk"), b"\n</doc>\n")
    bad = BadRows()
    assert [p[1] for p in read_pairs(wiki, bad=bad)] == ["北京是中国的首都。"]
    assert bad.count == 1 and "not UTF-8" in bad.examples[0] and "(line 7)" in bad.examples[0]


def test_json_array_not_utf8_is_one_line_error(tmp_path, capsys):
    from utils.raw_data_process import main

    src = _bytes_file(tmp_path / "raw.json", b'[{"prompt": "ok", "response": "\xff"}]')
    out = tmp_path / "clean.parquet"
    line = one_line_error(capsys, main, ["clean", "--input", str(src), "--output", str(out)])
    assert f"{src} is not UTF-8 text: line 1, byte 0xff at byte offset 31" in line
    assert not out.exists()


def test_dpo_and_eval_readers_reject_invalid_utf8(tmp_path):
    from utils.dpo_data_process import Report, read_preference_file
    from utils.parquet_io import iter_json_lines

    pref = {"prompt": "你好", "chosen": "你好，有什么可以帮你？", "rejected": "不知道"}
    src = _bytes_file(tmp_path / "pref.jsonl", _line(pref), GBK_ROW.replace(b'"response"', b'"chosen": "x", "rejected"'))
    report = Report()
    assert read_preference_file(src, report) == [pref]
    assert [(m.position, m.reason.split(":")[0]) for m in report.malformed] == [("line 2", "not UTF-8")]
    with pytest.raises(UserError, match=r"pred\.jsonl line 2: not UTF-8: byte 0xc4 at byte offset"):
        list(iter_json_lines(_bytes_file(tmp_path / "pred.jsonl", _line(GOOD), GBK_ROW), "predictions"))
