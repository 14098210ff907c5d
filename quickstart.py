"""Run the whole pipeline on the embedded corpus on a CPU and write a report card.

    python quickstart.py                # corpus -> tokenizer -> pretrain -> SFT -> DPO data
                                        # -> DPO (LoRA) -> merge -> evaluation -> report card
    python quickstart.py --fresh True   # redo every stage
    python quickstart.py --from sft     # redo from a stage on
    python quickstart.py --small True   # a cut-down run that only checks every stage works

The chat model lands in model_save/final (where cli_demo.py and api_demo.py look by
default), the report card in model_save/report/report.md.
"""
import sys

from utils.cli import parse_config, run_cli


def main() -> None:
    from utils.pipeline import QuickstartConfig, run_pipeline

    # `--from` is the documented spelling; it is a Python keyword, so the field is from_stage.
    argv = ["--from_stage" if a == "--from" else a.replace("--from=", "--from_stage=", 1) for a in sys.argv[1:]]
    _, cfg = parse_config(QuickstartConfig, argv, description=__doc__)
    run_pipeline(cfg)


if __name__ == "__main__":
    run_cli(main)
