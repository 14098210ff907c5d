"""transformers' Adafactor with the same update in about half the passes over memory.

    from model.adafactor import Adafactor     # drop-in for transformers.optimization.Adafactor

Used by both trainers (model/trainer.py, model/hf_seq2seq.py) for `--optimizer adafactor`
and `adafactor_scaled`. Why a subclass: transformers' `Adafactor.step` (5.25) sweeps each
weight matrix about 21 times per step (it computes the weight's RMS even when
scale_parameter is off, squares the gradient into a new tensor, adds eps in another pass,
divides, multiplies by lr and negates the update each in its own pass), and with
scale_parameter it compares a tensor with a float in Python, a device synchronisation per
weight on a GPU. The optimizer step is pure memory traffic; on the 0.2B model that is a
visible share of a training step (README, benchmarks). This step computes the same
quantities in about 12 sweeps and no synchronisation: the learning rate and
clipping fold into one 0-dim scale applied with `addcmul_`, and grad^2 and the update share
one buffer per weight shape, kept across steps (no new large tensor per step). The optimizer state (step,
exp_avg_sq_row, exp_avg_sq_col / exp_avg_sq, RMS) is transformers' own, so checkpoints are
interchangeable. Settings this step does not cover (relative_step, a first moment (beta1),
weight decay, fp16/bf16 or sparse parameters) run transformers' step unchanged.
"""
from __future__ import annotations

import math

import torch
from transformers.optimization import Adafactor as _HFAdafactor


class Adafactor(_HFAdafactor):
    def _fast_path(self) -> bool:
        for group in self.param_groups:
            if group["relative_step"] or group["beta1"] is not None or group["weight_decay"] != 0:
                return False
            for p in group["params"]:
                if p.grad is not None and (p.dtype != torch.float32 or p.grad.is_sparse):
                    return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._fast_path():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _scratch(self, grad: torch.Tensor) -> torch.Tensor:
        """A buffer of grad's shape kept across steps: a fresh multi-megabyte tensor per
        weight per step costs page faults that, on the 2-core machine, took longer than the
        arithmetic (profiled: 0.16 s for one 768 x 3072 `add` of transformers' step)."""
        buffers = self.__dict__.setdefault("_buffers", {})
        key = (tuple(grad.shape), grad.dtype, grad.device)
        if key not in buffers:
            buffers[key] = torch.empty_like(grad)
        return buffers[key]

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad, state = p.grad, self.state[p]
        factored = grad.dim() >= 2
        if len(state) == 0:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1]).to(grad)
                state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:]).to(grad)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0
        state["step"] += 1
        eps_sq, eps_scale = group["eps"]
        lr = torch.tensor(group["lr"], dtype=p.dtype, device=p.device)
        if group["scale_parameter"]:
            state["RMS"] = torch.linalg.vector_norm(p) / math.sqrt(p.numel())
            lr = lr * state["RMS"].clamp(min=eps_scale)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = torch.mul(grad, grad, out=self._scratch(grad))  # grad^2, then the update, in one buffer
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1).add_(eps_sq), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2).add_(eps_sq), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            torch.mul(grad, r_factor, out=update).mul_(col.unsqueeze(-2).rsqrt())
        else:
            sq = state["exp_avg_sq"]
            sq.mul_(beta2t).add_(update.add_(eps_sq), alpha=1.0 - beta2t)
            torch.rsqrt(sq, out=update).mul_(grad)
        rms = torch.linalg.vector_norm(update) / math.sqrt(update.numel())
        scale = lr / (rms / group["clip_threshold"]).clamp_(min=1.0)
        p.addcmul_(update, scale.neg_())
