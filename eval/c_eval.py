"""C-Eval accuracy of a model by category, zero- or few-shot.

    python eval/c_eval.py --data_dir DATA --model_dir model_save/sft/best [--n_shot 5] [--split S]

DATA is the unpacked official release (see eval/README.md). Prints the table (category,
correct, question count, accuracy, then Overall) and writes it as CSV to --output_dir,
with every question's prediction next to it. `--help` lists all settings.
"""
import sys
from pathlib import Path

# Run as a file from any directory: make the project's packages (config, model, utils, eval) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.multiple_choice import BENCHMARKS, MultipleChoiceConfig, run  # noqa: E402
from utils.cli import parse_config, run_cli  # noqa: E402


def main() -> None:
    _, cfg = parse_config(MultipleChoiceConfig, description=__doc__)
    run(BENCHMARKS["ceval"], cfg)


if __name__ == "__main__":
    run_cli(main)
