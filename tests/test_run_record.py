"""What every trainer leaves besides the model: the run summary (model/run_summary.py) and the
loss log with its plot (model/run_log.py), and the report card that reads them."""
import json

import pytest

from model.common import UserError
from model.run_log import RunLog, last_value, plot_losses, read_rows
from model.run_summary import RunSummary, read_summary


def _summary(**kw) -> RunSummary:
    base = dict(stage="sft", trainer="Seq2SeqTrainer", steps=12, steps_this_run=4, train_tokens=900,
                train_seconds=1.5, tokens_per_s=600.0, final_train_loss=2.5, eval_loss=2.75, last_eval_loss=2.8,
                eval_bleu4=0.1, model_dir="/m/best", resumed_from="/m/checkpoints/checkpoint-8", world_size=1,
                device="cpu", precision="fp32", wall_seconds=3.0, details={"batch_size": 6})
    return RunSummary(**{**base, **kw})


def test_summary_round_trip(tmp_path):
    s = _summary()
    s.write(tmp_path)
    assert read_summary(tmp_path / "train_summary.json") == s
    assert json.loads((tmp_path / "train_summary.json").read_text())["format"] == 1


@pytest.mark.parametrize("text, message", [
    ("{not json", "damaged run summary .*Expecting property name"),
    ("[1, 2]", "not a JSON object"),
    ('{"format": 1, "stage": "sft"}', "no 'trainer'"),
])
def test_damaged_summary_is_one_line_error(tmp_path, text, message):
    path = tmp_path / "train_summary.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as exc:
        read_summary(path)
    assert "\n" not in str(exc.value)


def test_summary_with_a_wrong_type_is_refused(tmp_path):
    s = _summary()
    s.write(tmp_path)
    data = json.loads((tmp_path / "train_summary.json").read_text())
    for key, value in (("steps", "12"), ("eval_loss", "2.7"), ("steps", True), ("model_dir", 3)):
        (tmp_path / "train_summary.json").write_text(json.dumps({**data, key: value}))
        with pytest.raises(UserError, match=f"'{key}' is {value!r}, expected"):
            read_summary(tmp_path / "train_summary.json")
    with pytest.raises(UserError, match="run summary not found"):
        read_summary(tmp_path / "nothing.json")


# what the three trainers wrote before the one format (abridged real files)
OLD_TRAIN_PY = {"global_step": 8, "train_runtime_s": 4.0, "non_padding_tokens": 2000, "tokens_per_s": 500.0,
                "best_bleu4": 0.02, "best_model_dir": "/p/best", "world_size": 1, "data_wait_share": 0.01}
OLD_HF = {"stage": "sft", "steps": 8, "steps_this_run": 8, "resumed_from": None, "train_tokens": 1200,
          "train_seconds": 2.0, "tokens_per_sec": 600.0, "final_train_loss": 3.1, "mean_train_loss_this_run": 3.5,
          "final_eval_loss": 3.0, "last_eval_loss": 3.2, "eval_bleu4": 0.01, "device": "cpu", "precision": "fp32",
          "model_dir": "/s/best", "wall_seconds": 9.0, "job": {"stage": "sft"}}
OLD_DPO = {"global_step": 4, "train_loss": 0.69, "train_tokens": 800, "tokens_per_sec": 100.0,
           "best_checkpoint": None, "train_runtime": 8.0, "epoch": 2.0,
           "last_log": {"loss": 0.6, "step": 4}}


@pytest.mark.parametrize("old, expect", [
    (OLD_TRAIN_PY, dict(steps=8, train_tokens=2000, tokens_per_s=500.0, eval_bleu4=0.02, model_dir="/p/best",
                        final_train_loss=None, eval_loss=None)),
    (OLD_HF, dict(steps=8, train_tokens=1200, tokens_per_s=600.0, final_train_loss=3.1, eval_loss=3.0,
                  stage="sft")),
    (OLD_DPO, dict(steps=4, train_tokens=800, tokens_per_s=100.0, train_seconds=8.0, final_train_loss=0.6,
                   eval_loss=None)),
])
def test_summaries_of_earlier_versions_are_still_read(tmp_path, old, expect):
    path = tmp_path / "train_summary.json"
    path.write_text(json.dumps(old))
    s = read_summary(path)
    assert {k: getattr(s, k) for k in expect} == expect


def test_log_resumes_where_the_checkpoint_was_and_plots(tmp_path):
    log = RunLog(tmp_path, eval_extra=("bleu4",))
    log.start()
    for step in range(1, 7):
        log.train_row(step=step, epoch=0, loss=3.0 - step / 10, lr=0.001)
    log.eval_row(step=4, epoch=0, valid_loss=2.9, bleu4=0.5)
    log.eval_row(step=6, epoch=0, valid_loss=2.8, bleu4=0.25)
    with open(tmp_path / "train_loss.csv", "a", encoding="utf-8") as fh:
        fh.write("7,0,2.")  # the torn last line of a killed run
    assert [r["step"] for r in read_rows(tmp_path / "train_loss.csv")] == [str(s) for s in range(1, 7)]
    assert last_value(tmp_path / "train_loss.csv", "loss") == 2.4 and last_value(tmp_path / "eval.csv", "bleu4") == 0.25

    RunLog(tmp_path, eval_extra=("bleu4",)).start(resume_step=4)  # resumed from the checkpoint of step 4
    assert [r["step"] for r in read_rows(tmp_path / "train_loss.csv")] == ["1", "2", "3", "4"]
    assert [r["step"] for r in read_rows(tmp_path / "eval.csv")] == ["4"]
    assert float(read_rows(tmp_path / "train_loss.csv")[2]["loss"]) == 3.0 - 3 / 10  # every digit kept
    png = plot_losses(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    RunLog(tmp_path).start()  # a fresh run starts empty files
    assert read_rows(tmp_path / "train_loss.csv") == [] and plot_losses(tmp_path) is None


def test_report_card_row_comes_from_the_summary(tmp_path):
    from utils.report_card import _stage

    _summary().write(tmp_path / "sft")
    row = _stage("sft", tmp_path / "sft", tmp_path / "report")
    assert row == {"steps": 12, "tokens": 900, "tokens_per_s": 600.0, "train_loss": 2.5, "valid_loss": 2.75,
                   "png": None}
    (tmp_path / "sft" / "train_summary.json").write_text('{"format": 1}')
    with pytest.raises(UserError, match="damaged run summary"):
        _stage("sft", tmp_path / "sft", tmp_path / "report")
    assert _stage("dpo", tmp_path / "dpo", tmp_path / "report")["steps"] is None  # stage not run


def test_damaged_log_is_one_line_error(tmp_path):
    (tmp_path / "train_loss.csv").write_text("step,epoch,loss\n1,0,2.5\nabc,0,2.4\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"damaged loss log .*train_loss.csv: line 3 has step 'abc'"):
        RunLog(tmp_path).start(resume_step=2)
