"""Text-to-text pretraining from scratch with transformers' Seq2SeqTrainer (the HF Trainer path).

    python pre_train.py --model_config_file model_config_tiny.json \
        --tokenizer_dir model_save/tokenizer --train_file data/my_train_dataset.parquet \
        --validation_file data/my_valid_dataset.parquet --output_dir model_save/pretrain_hf \
        --max_steps 200 --batch_size_per_gpu 16 --gradient_accumulation_steps 1
    python pre_train.py --is_keep_training True ...      # continue from the newest checkpoint
    tensorboard --logdir model_save/pretrain/runs

The same data (parquet prompt/response pairs) and model (a fresh T5 from model_config_file)
as `train.py`, with the settings of config.TrainConfig: batch_size_per_gpu,
gradient_accumulation_steps, warmup_steps, epochs / max_steps, optimizer (adafactor|adamw),
peak learning rate learn_rate * div_factor, mixed_precision (fp32 on CPU), logging_steps,
save_steps, keep_latest_n_ckp, group_by_length, max_seq_len, eval_max_samples, seed.
Writes `<output_dir>/best` (best validation loss), `<output_dir>/checkpoints/`,
`<output_dir>/runs/` and `<output_dir>/train_summary.json`; see model/hf_seq2seq.py.
The fields only train.py acts on are refused with one line naming it: --is_finetune True,
--streaming yes and --test_file (test with `python train.py test` afterwards).
"""
from config import TrainConfig
from utils.cli import parse_config, require_writable, run_cli


def main(argv=None) -> None:
    _, cfg = parse_config(TrainConfig, argv, description=__doc__)
    require_writable(cfg.output_dir, "--output_dir", is_dir=True)  # before any loading, not at the first save
    from model.hf_seq2seq import job_from_train_config, run

    run(job_from_train_config(cfg))


if __name__ == "__main__":
    run_cli(main)
