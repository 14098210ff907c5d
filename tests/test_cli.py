"""The one CLI mechanism: every config field is a flag, --help lists defaults, typos fail."""
import subprocess
import sys

import pytest

from config import PROJECT_ROOT, DpoConfig, InferConfig, SFTconfig, TrainConfig
from conftest import ROOT
from utils.cli import UserError, config_fields, parse_config


def test_overrides_of_every_type():
    cmd, cfg = parse_config(TrainConfig, ["train", "--epochs", "3", "--learn_rate=0.002", "--is_finetune=True",
                                          "--mixed_precision", "no", "--max_steps", "7"],
                            commands=["train", "test"])
    assert cmd == "train"
    assert (cfg.epochs, cfg.learn_rate, cfg.is_finetune, cfg.mixed_precision, cfg.max_steps) == (3, 0.002, True, "no", 7)
    assert cfg.batch_size_per_gpu == TrainConfig.batch_size_per_gpu  # untouched fields keep defaults


def test_default_command_and_bool_spellings():
    cmd, cfg = parse_config(TrainConfig, ["--is_keep_training", "yes"], commands=["train", "test"],
                            default_command="train")
    assert cmd == "train" and cfg.is_keep_training is True
    _, cfg = parse_config(TrainConfig, ["--is_finetune", "False"])
    assert cfg.is_finetune is False


def test_every_training_config_has_max_steps_and_root_relative_paths():
    for cls in (TrainConfig, SFTconfig, DpoConfig):
        assert "max_steps" in config_fields(cls)
    for cls in (TrainConfig, SFTconfig, DpoConfig, InferConfig):
        for name in config_fields(cls):
            value = getattr(cls, name, None)
            if isinstance(value, str) and "/" in value:
                assert value.startswith(str(PROJECT_ROOT)), (cls.__name__, name, value)


def test_unknown_command_and_flag():
    with pytest.raises(UserError, match="unknown command 'trian'"):
        parse_config(TrainConfig, ["trian"], commands=["train", "test"])
    with pytest.raises(UserError, match=r"^unknown setting --epoch \(did you mean --epochs\?\): "):
        parse_config(TrainConfig, ["--epoch", "3"])  # a prefix of --epochs is not accepted
    with pytest.raises(UserError, match=r"^unknown settings --nonsense_x, --other: "):
        parse_config(TrainConfig, ["--nonsense_x", "1", "--other=2"])
    with pytest.raises(UserError, match=r"^unexpected argument 'stray': settings are given as --name value"):
        parse_config(TrainConfig, ["--epochs", "3", "stray"])
    with pytest.raises(SystemExit) as exc:  # argparse's own one-line error for a bad value
        parse_config(TrainConfig, ["--epochs", "three"])
    assert exc.value.code == 2


def test_help_lists_fields_with_defaults():
    res = subprocess.run([sys.executable, str(ROOT / "train_tokenizer.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0
    for flag in ("--corpus_file", "--vocab_size", "--token_type", "--library", "--output_dir"):
        assert flag in res.stdout
    assert "40960" in res.stdout  # defaults are shown


def test_scripts_work_from_another_directory(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train_tokenizer.py"), "--corpus_file", "missing.txt"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "corpus file not found: missing.txt" in res.stderr
