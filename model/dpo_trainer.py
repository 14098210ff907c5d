"""DPO for the encoder-decoder chat model, on transformers' `Trainer`.

    from model.dpo_trainer import Seq2SeqDPOTrainer, PreferenceCollator, dpo_loss

Why not trl's DPOTrainer: trl 0.29 and later (checked up to 1.16.0) take causal language
models only (their docs: "Only causal language models are supported"; prompt and answer
are concatenated into one decoder sequence), and trl 0.28, the last release with
`is_encoder_decoder`, cannot be imported with transformers 5: its `is_weave_available()`
returns transformers' `_is_package_available(...)`, which in transformers 5 is a tuple and
therefore always true, so `from trl import DPOTrainer` fails with "No module named
'weave'" in a clean environment. What DPO needs beyond `Trainer` is small and is written here:

- the sequence log-probability of an answer given the prompt: the encoder reads
  prompt + [EOS], the decoder is teacher-forced on answer + [EOS] (the SFT format), and the
  token log-probabilities of the answer are summed;
- the sigmoid DPO loss (Rafailov et al., 2023) with the implicit rewards
  beta * (log pi(y|x) - log pi_ref(y|x));
- the reference: a frozen copy of the SFT model, or, for a peft LoRA policy, the same
  model with its adapter disabled (one copy of the weights in memory);
- the metrics (rewards of chosen and rejected, their margin, preference accuracy), averaged
  over each logging window, for the console, the loss log (model/run_log.py) and any
  `report_to` integration.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import Trainer

IGNORE = -100
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards of chosen and rejected.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), all arguments being
    summed sequence log-probabilities of shape (B,).
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of the labels, number of label tokens) per row; IGNORE is skipped."""
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    logits = logits.float()
    token = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    return (token * mask).sum(dim=-1), mask.sum(dim=-1)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start] + labels[:-1], ignored positions as padding."""
    dec = labels.new_full(labels.shape, pad_id)
    dec[:, 1:] = labels[:, :-1]
    dec[:, 0] = start_id
    return dec.masked_fill(dec == IGNORE, pad_id)


def pair_logps(model, batch: dict, start_id: int, pad_id: int) -> dict:
    """Summed log-probs (and lengths) of the chosen and rejected answers of a batch.

    Chosen and rejected go through the model as one batch of 2B rows with the prompt
    repeated: one forward (and backward) per step, and `model` may be any wrapper
    (DDP, peft) since only its forward is called.
    """
    chosen, rejected = batch["chosen_labels"], batch["rejected_labels"]
    width = max(chosen.size(1), rejected.size(1))
    labels = torch.cat([F.pad(chosen, (0, width - chosen.size(1)), value=IGNORE),
                        F.pad(rejected, (0, width - rejected.size(1)), value=IGNORE)], dim=0)
    out = model(input_ids=batch["input_ids"].repeat(2, 1), attention_mask=batch["attention_mask"].repeat(2, 1),
                decoder_input_ids=shift_right(labels, start_id, pad_id), use_cache=False)
    logps, lengths = sequence_logps(out.logits, labels)
    n = chosen.size(0)
    return {"chosen": logps[:n], "rejected": logps[n:], "chosen_len": lengths[:n], "rejected_len": lengths[n:]}


def encode_pairs(tokenizer, prompts, chosen, rejected, max_seq_len: int) -> dict:
    """Token ids for `datasets.map`: prompt + [EOS] for the encoder, answers + [EOS] as labels
    (and which texts max_seq_len cut, as model.dataset.encode_batch)."""
    from model.dataset import encode_batch

    enc_c = encode_batch(tokenizer, prompts, chosen, max_seq_len)
    enc_r = encode_batch(tokenizer, prompts, rejected, max_seq_len)
    return {"input_ids": enc_c["input_ids"], "chosen_labels": enc_c["labels"], "rejected_labels": enc_r["labels"],
            "prompt_cut": enc_c["prompt_cut"],  # for report_cuts: an answer cut is either of the two
            "response_cut": [c or r for c, r in zip(enc_c["response_cut"], enc_r["response_cut"])]}


class PreferenceCollator:
    """Right-pads prompts (with an attention mask) and both answers (with IGNORE)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    @staticmethod
    def _pad(seqs, value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    def __call__(self, features: list[dict]) -> dict:
        prompts = [f["input_ids"] for f in features]
        batch = {
            "input_ids": self._pad(prompts, self.pad_id),
            "attention_mask": self._pad([[1] * len(p) for p in prompts], 0),
            "chosen_labels": self._pad([f["chosen_labels"] for f in features], IGNORE),
            "rejected_labels": self._pad([f["rejected_labels"] for f in features], IGNORE),
        }
        for key in REF_COLUMNS:  # precomputed reference log-probs (add_reference_logps)
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        return batch


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: with it the policy's log-probs are noisy and differ from the reference's
    even before the first update (trl's `disable_dropout` default, for the same reason)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0  # T5Attention keeps its attention-weight dropout as a float


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class Seq2SeqDPOTrainer(Trainer):
    """`Trainer` whose loss is DPO; everything else (optimiser, schedule, accumulation,
    mixed precision, checkpoints and resume, distributed training) is Trainer's own.

    Pass `ref_model` for full DPO; leave it None with a peft model to use the policy with
    its adapter disabled as the reference.
    """

    def __init__(self, *args, ref_model=None, beta: float = 0.1, precompute_ref_log_probs: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if ref_model is None and not is_peft_model(self.model):
            raise ValueError("a reference model is required unless the policy is a peft (LoRA) model")
        self.beta = beta
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.requires_grad_(False)
            self.ref_model = ref_model.to(self.args.device).eval()
        config = self.model.config
        self.start_id, self.pad_id = config.decoder_start_token_id, config.pad_token_id
        if precompute_ref_log_probs:
            # the reference is frozen: its log-probs of a pair are the same at every step of
            # every epoch, so they are computed once here and travel with the dataset (as
            # trl's precompute_ref_log_probs); the reference model is then no longer needed
            ref = self.ref_model if self.ref_model is not None else self.model.to(self.args.device)
            kw = dict(collator=self.data_collator, batch_size=self.args.per_device_eval_batch_size,
                      device=self.args.device, start_id=self.start_id, pad_id=self.pad_id)
            self.train_dataset = add_reference_logps(self.train_dataset, ref, **kw)
            if self.eval_dataset is not None:
                self.eval_dataset = add_reference_logps(self.eval_dataset, ref, **kw)
            self.ref_model = None
        self._stored = {"train": {}, "eval": {}}
        self.trained_tokens = 0  # non-padding tokens of the policy's forward passes (a tensor once training)

    def _reference_logps(self, model, inputs: dict) -> dict:
        if REF_COLUMNS[0] in inputs:
            return {"chosen": inputs[REF_COLUMNS[0]], "rejected": inputs[REF_COLUMNS[1]]}
        with torch.no_grad():
            if self.ref_model is not None:
                return pair_logps(self.ref_model, inputs, self.start_id, self.pad_id)
            policy = self.accelerator.unwrap_model(model)
            with policy.disable_adapter():
                return pair_logps(policy, inputs, self.start_id, self.pad_id)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        policy = pair_logps(model, inputs, self.start_id, self.pad_id)
        ref = self._reference_logps(model, inputs)
        losses, chosen_r, rejected_r = dpo_loss(policy["chosen"], policy["rejected"], ref["chosen"],
                                                ref["rejected"], self.beta)
        loss = losses.mean()
        gather = self.accelerator.gather_for_metrics
        metrics = {
            "rewards/chosen": gather(chosen_r).mean(),
            "rewards/rejected": gather(rejected_r).mean(),
            "rewards/margins": gather(chosen_r - rejected_r).mean(),
            "rewards/accuracies": gather((chosen_r > rejected_r).float()).mean(),
            "logps/chosen": gather(policy["chosen"].detach()).mean(),
            "logps/rejected": gather(policy["rejected"].detach()).mean(),
        }
        if model.training:  # kept on the device: no sync per step
            self.trained_tokens = self.trained_tokens + (
                2 * inputs["attention_mask"].sum() + (inputs["chosen_labels"] != IGNORE).sum()
                + (inputs["rejected_labels"] != IGNORE).sum()).detach()
        bucket = self._stored["train" if model.training else "eval"]
        for key, value in metrics.items():
            bucket.setdefault(key, []).append(value.detach())  # no device sync per step: read at log time
        if return_outputs:
            return loss, {"chosen_rewards": chosen_r, "rejected_rewards": rejected_r}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add the DPO metrics, averaged since the last log, to Trainer's record."""
        split = "eval" if "eval_loss" in logs else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._stored[split].items():
            if values:
                logs[prefix + key] = torch.stack(values).float().mean().item()
        self._stored[split] = {}
        super().log(logs, start_time)


@torch.no_grad()
def add_reference_logps(dataset, reference, collator, batch_size: int, device, start_id: int, pad_id: int):
    """`dataset` (tokenised pairs) with columns ref_chosen_logps / ref_rejected_logps: the
    summed answer log-probs under `reference`, in eval mode. A peft policy is scored with its
    adapter disabled, i.e. as the SFT model it started from."""
    chosen, rejected = [], []
    was_training = reference.training
    reference.eval()
    ctx = reference.disable_adapter() if is_peft_model(reference) else nullcontext()
    pairs = dataset.select_columns(["input_ids", "chosen_labels", "rejected_labels"])
    try:
        with ctx:
            for start in range(0, len(pairs), batch_size):
                rows = pairs[start:start + batch_size]
                batch = collator([dict(zip(rows, values)) for values in zip(*rows.values())])
                out = pair_logps(reference, {k: v.to(device) for k, v in batch.items()}, start_id, pad_id)
                chosen.extend(out["chosen"].float().cpu().tolist())
                rejected.extend(out["rejected"].float().cpu().tolist())
    finally:
        reference.train(was_training)
    dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
    return dataset.add_column(REF_COLUMNS[0], chosen).add_column(REF_COLUMNS[1], rejected)


@torch.no_grad()
def score_pairs(policy, tokenizer, rows: list[dict], max_seq_len: int, batch_size: int,
                reference=None, device=None) -> dict:
    """Sequence log-probs of chosen and rejected under `policy` and its reference.

    `reference=None` with a peft policy: the reference is the policy with its adapter
    disabled. Returns lists (one value per pair) of logps and token counts.
    """
    collate = PreferenceCollator(tokenizer.pad_token_id)
    device = device or next(policy.parameters()).device
    config = policy.config
    start, pad = config.decoder_start_token_id, config.pad_token_id
    out = {k: [] for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected",
                           "chosen_len", "rejected_len")}
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        enc = encode_pairs(tokenizer, [r["prompt"] for r in part], [r["chosen"] for r in part],
                           [r["rejected"] for r in part], max_seq_len)
        batch = collate([dict(zip(enc, values)) for values in zip(*enc.values())])
        batch = {k: v.to(device) for k, v in batch.items()}
        pol = pair_logps(policy, batch, start, pad)
        if reference is policy:  # scoring the reference against itself
            ref = pol
        elif reference is not None:
            ref = pair_logps(reference, batch, start, pad)
        else:
            ctx = policy.disable_adapter() if is_peft_model(policy) else nullcontext()
            with ctx:
                ref = pair_logps(policy, batch, start, pad)
        for key, value in (("policy_chosen", pol["chosen"]), ("policy_rejected", pol["rejected"]),
                           ("ref_chosen", ref["chosen"]), ("ref_rejected", ref["rejected"]),
                           ("chosen_len", pol["chosen_len"]), ("rejected_len", pol["rejected_len"])):
            out[key].extend(value.float().cpu().tolist())
    return out


def preference_metrics(scores: dict, beta: float) -> dict:
    """Preference accuracies and reward margin from `score_pairs` output.

    - reward_accuracy / reward_margin: DPO's implicit reward beta * (log pi - log pi_ref),
      accuracy = share of pairs with reward(chosen) > reward(rejected) (strictly, as trl).
      For the reference model itself every reward is 0: margin 0, accuracy 0.
    - logp_accuracy: share of pairs whose chosen answer has the higher summed log-probability
      under the model; logp_accuracy_per_token compares the per-token mean instead (fairer
      when the answers' lengths differ). Both are given for the policy and the reference, so
      one report holds the "before DPO" (reference = SFT) and "after DPO" figures;
      `logp_accuracy` / `logp_accuracy_per_token` repeat the policy's.
    """
    n = len(scores["policy_chosen"])
    if n == 0:
        raise ValueError("no pairs scored")

    def acc(a, b):
        return sum(x > y for x, y in zip(a, b)) / n

    def per_token(values, lengths):
        return [v / max(1, l) for v, l in zip(values, lengths)]

    rc = [beta * (p - r) for p, r in zip(scores["policy_chosen"], scores["ref_chosen"])]
    rr = [beta * (p - r) for p, r in zip(scores["policy_rejected"], scores["ref_rejected"])]
    out = {"pairs": n, "beta": beta,
           "reward_accuracy": acc(rc, rr),
           "reward_margin": sum(c - r for c, r in zip(rc, rr)) / n,
           "reward_chosen": sum(rc) / n, "reward_rejected": sum(rr) / n}
    for who in ("policy", "ref"):
        c, r = scores[f"{who}_chosen"], scores[f"{who}_rejected"]
        name = "policy" if who == "policy" else "reference"
        out[f"{name}_logp_accuracy"] = acc(c, r)
        out[f"{name}_logp_accuracy_per_token"] = acc(per_token(c, scores["chosen_len"]),
                                                     per_token(r, scores["rejected_len"]))
        out[f"{name}_logp_chosen_mean"] = sum(c) / n
        out[f"{name}_logp_rejected_mean"] = sum(r) / n
    # the evaluated model's own figures under plain names
    out["logp_accuracy"] = out["policy_logp_accuracy"]
    out["logp_accuracy_per_token"] = out["policy_logp_accuracy_per_token"]
    return out
