"""Score a model on a generation task of the embedded corpus (or any prompt/response file).

    python eval/eval_tasks.py --model_dir model_save/sft/best \
        --test_file data/demo/entity_test.parquet --task entity [--max_rows 200] [--batch_size 16] [--max_new_tokens 128]

--task sentiment (accuracy + majority-class baseline), entity (micro F1/P/R of the
(entity, type) pairs) or bleu (corpus BLEU-4). Writes the metrics as JSON (--output_json)
and the generated answers as JSON lines with a `response` field (--predictions_file),
which finetune_examples/info_extract/evaluate.py can score again.
"""
import sys
from pathlib import Path

# Run as a file from any directory: make the project's packages (config, model, utils, eval) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.tasks import EvalTasksConfig, evaluate_file  # noqa: E402
from utils.cli import parse_config, run_cli  # noqa: E402


def main() -> None:
    _, cfg = parse_config(EvalTasksConfig, description=__doc__)
    evaluate_file(cfg)


if __name__ == "__main__":
    run_cli(main)
