"""Instruction fine-tuning (SFT) with transformers' Seq2SeqTrainer.

    python sft_train.py --finetune_from_ckp_file model_save/pretrain/best \
        --sft_train_file data/sft_train.parquet --sft_eval_file data/sft_eval.parquet \
        --output_dir model_save/sft
    python sft_train.py --resume_from_checkpoint last ...   # or a checkpoint directory

Starts from a pretrained model directory (loaded strictly), trains on a parquet or JSON /
JSON lines file of `prompt`/`response` pairs, evaluates (loss, BLEU-4 of greedy answers)
when sft_eval_file is set, and writes `<output_dir>/best` (default model_save/sft/best:
the best eval loss, else the last step), `<output_dir>/checkpoints/`, `<output_dir>/runs/`
(tensorboard) and `<output_dir>/train_summary.json`. Settings: config.SFTconfig
(`python sft_train.py --help`); the logic is model/hf_seq2seq.py.
"""
from config import SFTconfig
from utils.cli import parse_config, require_writable, run_cli


def main(argv=None) -> None:
    _, cfg = parse_config(SFTconfig, argv, description=__doc__)
    require_writable(cfg.output_dir, "--output_dir", is_dir=True)  # before any loading, not at the first save
    from model.hf_seq2seq import job_from_sft_config, run

    run(job_from_sft_config(cfg))


if __name__ == "__main__":
    run_cli(main)
