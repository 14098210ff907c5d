"""Pretrain (or, with --is_finetune=True, fine-tune) the chat model with the project's accelerate trainer.

    python train.py train --train_file data/my_train_dataset.parquet ...   # one CPU or GPU
    accelerate launch ./train.py train                                     # GPUs, as configured by `accelerate config`
    accelerate launch --multi_gpu --num_processes 2 ./train.py train       # two GPUs
    accelerate launch --config_file accelerate.yaml ./train.py train       # two GPUs, DeepSpeed ZeRO-2 + CPU offload
    torchrun --nproc_per_node 2 train.py train ...                         # two ranks on a CPU-only machine (gloo)
    python train.py train --is_keep_training=True                          # continue exactly where it stopped
    python train.py train --is_finetune=True --finetune_from_ckp_file model_save/pretrain/best \
        --learn_rate 1e-7 --div_factor 500 --output_dir model_save/sft_accelerate
    python train.py test --test_model_dir model_save/pretrain/best         # BLEU-4 and loss on --test_file

Settings are TrainConfig in config.py (`python train.py --help`). The best model by
validation BLEU-4 is written to <output_dir>/best, resumable checkpoints to
<output_dir>/checkpoints/, logs, train_loss.csv, eval.csv and loss_curve.png to <output_dir>.
Ctrl+C or SIGTERM saves a checkpoint and exits (130 / 143), as every training stage does.
On a CPU-only machine `accelerate launch --multi_gpu --num_processes 2` starts two
independent single-process runs; use torchrun for two real ranks.
"""
from config import TrainConfig
from utils.cli import parse_config, require_writable, run_cli


def main() -> None:
    command, cfg = parse_config(TrainConfig, commands=("train", "test"), default_command="train", description=__doc__)
    require_writable(cfg.output_dir, "--output_dir", is_dir=True)  # before any loading, not at the first save
    from model.trainer import ChatTrainer

    trainer = ChatTrainer(cfg)
    trainer.train() if command == "train" else trainer.test()


if __name__ == "__main__":
    run_cli(main)
