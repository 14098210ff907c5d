"""Run under torchrun by tests/test_trainer.py: train.py's trainer on each rank, recording what
the multi-process test checks, so that the trainer itself carries no test scaffolding.

    torchrun --nproc_per_node 2 tests/ranks_probe.py train --output_dir ... [train.py's flags]

Writes <output_dir>/probe-rank<r>.json: the rank's world size and distributed type, the row
numbers of every micro-batch it trained on (in order) and a SHA-256 of its final weights.
"""
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import TrainConfig  # noqa: E402
from model.trainer import ChatTrainer  # noqa: E402
from utils.cli import parse_config  # noqa: E402


class RecordingTrainer(ChatTrainer):
    rows: list[int] = []

    def _micro_step(self, forward, batch, scale, sync):
        self.rows.extend(int(i) for i in batch["index"])
        return super()._micro_step(forward, batch, scale, sync)


def main() -> None:
    _, cfg = parse_config(TrainConfig, commands=("train",), default_command="train")
    trainer = RecordingTrainer(cfg)
    trainer.train()
    acc = trainer.accelerator
    h = hashlib.sha256()
    for name, p in sorted(acc.unwrap_model(trainer.model).state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    probe = {"rank": acc.process_index, "world_size": acc.num_processes,
             "distributed_type": str(acc.distributed_type), "rows": trainer.rows, "weights_sha256": h.hexdigest()}
    (Path(cfg.output_dir) / f"probe-rank{acc.process_index}.json").write_text(json.dumps(probe))


if __name__ == "__main__":
    main()
