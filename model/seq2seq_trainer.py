"""The Seq2SeqTrainer of pre_train.py / sft_train.py (model/hf_seq2seq.py builds and runs it).

    trainer = CountingSeq2SeqTrainer(model=..., args=..., per_sample_loss=True, ...)

A module of its own so that model/hf_seq2seq.py checks a job's files before transformers'
Trainer is imported (measured: that import alone takes about 2 s of a cold start).
"""
from __future__ import annotations

import torch.nn.functional as F
from transformers import Seq2SeqTrainer


class CountingSeq2SeqTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that counts the non-padding tokens it trains on.

    Encoder tokens (attention mask) plus decoder tokens (labels other than -100): the
    Trainer's own include_num_input_tokens_seen counts the encoder side only.
    """
    def __init__(self, *args, per_sample_loss: bool = False, optimizer_cls_and_kwargs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_sample_loss = per_sample_loss
        self.trained_tokens = 0
        # Trainer's own hook for a custom optimiser; Seq2SeqTrainer.__init__ does not pass it through
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        # T5's forward takes **kwargs, so the Trainer assumes it normalises its loss by
        # num_items_in_batch and skips the division by gradient_accumulation_steps; it
        # does not (it returns the batch mean), which would scale the logged loss and
        # the gradients by the number of accumulation steps.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # With a token mean, a task whose answers are 2 tokens (a sentiment label) gets a
        # tiny share of the gradient next to one whose answers are 30 tokens long; the
        # per-pair mean gives every pair the same weight. Evaluation keeps the token mean.
        if not (self.per_sample_loss and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        # the collator already built decoder_input_ids from the labels; without labels the
        # model skips its own (token-mean) loss instead of computing it for nothing
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if "decoder_input_ids" not in model_inputs:
            unwrapped = self.accelerator.unwrap_model(model)
            model_inputs["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)
        outputs = model(**model_inputs)
        token_loss = F.cross_entropy(
            outputs.logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = labels != -100
        loss = ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained_tokens += int(inputs["attention_mask"].sum()) + int((inputs["labels"] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def _issue_warnings_after_load(self, load_result):
        # A checkpoint holds shared.weight once: the encoder's and decoder's embeddings and the
        # tied lm_head are that same tensor and are never saved, and load_state_dict fills them
        # through it. transformers (5.25) still reports them as "missing keys" whenever it loads
        # the best model or resumes; only keys that are missing indeed are passed on.
        if hasattr(load_result, "_replace"):  # torch's _IncompatibleKeys (FSDP loads may return other things)
            load_result = load_result._replace(missing_keys=truly_missing(self.model, load_result.missing_keys))
        super()._issue_warnings_after_load(load_result)


def truly_missing(model, missing_keys: list[str]) -> list[str]:
    """The keys of `missing_keys` that no other name of the same (tied) parameter loaded."""
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    missing = set(missing_keys)
    loaded_through = {name for names in names_of.values() if not set(names) <= missing for name in names}
    return [key for key in missing_keys if key not in loaded_through]
