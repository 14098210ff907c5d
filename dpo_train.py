"""DPO on the SFT model: train (full, or LoRA), merge the LoRA adapter, evaluate preferences.

    python dpo_train.py train --dpo_train_file data/my_dpo_data.json           # full DPO
    python dpo_train.py train --use_lora True                                  # LoRA (r 16, alpha 16)
    python dpo_train.py merge                                                  # adapter -> full model
    python dpo_train.py eval --model model_save/dpo/best --dpo_eval_file data/my_dpo_eval.json
    python dpo_train.py train --resume_from_checkpoint last                    # after Ctrl+C / SIGTERM

Build the preference data first with `python -m utils.dpo_data_process`. The trainer is the
project's own seq2seq DPO on transformers' Trainer (model/dpo_trainer.py says why trl's
DPOTrainer is not used). `--help` lists every setting (config.DpoConfig).
"""
from config import DpoConfig
from utils.cli import parse_config, require_writable, run_cli


def main() -> None:
    command, cfg = parse_config(DpoConfig, commands=("train", "merge", "eval"), default_command="train",
                                description=__doc__)
    # what the command writes, checked before any loading
    if command == "merge":
        require_writable(cfg.merged_output_dir, "--merged_output_dir", is_dir=True)
    elif command == "eval" and cfg.eval_output_file:
        require_writable(cfg.eval_output_file, "--eval_output_file")
    else:
        require_writable(cfg.output_dir, "--output_dir", is_dir=True)
    from model import dpo

    {"train": dpo.train, "merge": dpo.merge, "eval": dpo.evaluate}[command](cfg)


if __name__ == "__main__":
    run_cli(main)
