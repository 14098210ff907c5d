"""The chat model: T5ForConditionalGeneration plus the original project's `my_generate`.

This file is copied into every saved model directory by `save_pretrained` (the class is
registered for AutoModelForSeq2SeqLM), so a directory loads in any Python process with

    AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)

It must therefore import nothing from this project except its sibling
configuration_chat_model.py (which is copied along with it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from .configuration_chat_model import TextToTextModelConfig

SEARCH_TYPES = ("greedy", "beam", "sampling", "contrastive")

# The original project's decoding settings.
CONTRASTIVE_PENALTY_ALPHA = 0.5
CONTRASTIVE_TOP_K = 50


class TextToTextModel(T5ForConditionalGeneration):
    config_class = TextToTextModelConfig

    def generation_config_for(self, search_type: str, max_seq_len: int) -> GenerationConfig:
        """The original's decoding settings for greedy, beam and sampling; [EOS], [PAD], [BOS] and
        the decoder's start token are the model config's, as contrastive search reads them (and
        the HF Trainer checks them against the tokenizer's, chat_model.fill_special_token_ids)."""
        if search_type not in SEARCH_TYPES:
            raise ValueError(f"search_type must be one of {SEARCH_TYPES}, got {search_type!r}")
        cfg = self.config
        gc = GenerationConfig(
            eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
            bos_token_id=getattr(cfg, "bos_token_id", None),  # T5Config defines none of its own
            decoder_start_token_id=cfg.decoder_start_token_id,
            max_new_tokens=max_seq_len, remove_invalid_values=True,
        )
        if search_type == "beam":
            # beam-search multinomial sampling, as the original
            gc.num_beams = 5
            gc.do_sample = True
            gc.top_k = 50
            gc.top_p = 0.95
            gc.no_repeat_ngram_size = 4
            gc.length_penalty = -2.0
            gc.early_stopping = True
        elif search_type == "sampling":
            gc.num_beams = 1
            gc.do_sample = True
            gc.top_k = 50
            gc.top_p = 0.8
            gc.temperature = 0.98
            gc.no_repeat_ngram_size = 4
        else:  # greedy (contrastive uses its own loop below)
            gc.num_beams = 1
            gc.do_sample = False
        return gc

    @torch.no_grad()
    def my_generate(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor,
                    max_seq_len: int = 256, search_type: str = "greedy", streamer=None,
                    repetition_penalty: float = 1.0) -> torch.LongTensor:
        """Generate answers of at most `max_seq_len` new tokens; returns decoder token ids (starting
        with the start token). Greedy unless `search_type` says otherwise (the original defaulted to
        beam, which no caller used). `repetition_penalty` > 1 divides the scores of tokens already
        generated (Keskar et al. 2019, transformers' RepetitionPenaltyLogitsProcessor); 1 = none."""
        if search_type == "contrastive":
            return contrastive_search(self, input_ids, attention_mask, max_new_tokens=max_seq_len,
                                      penalty_alpha=CONTRASTIVE_PENALTY_ALPHA,
                                      top_k=CONTRASTIVE_TOP_K, streamer=streamer)
        gc = self.generation_config_for(search_type, max_seq_len)
        if repetition_penalty != 1.0:
            gc.repetition_penalty = repetition_penalty
        return self.generate(inputs=input_ids, attention_mask=attention_mask,
                             generation_config=gc, streamer=streamer)


def degeneration_scores(top_probs: torch.Tensor, cand_hidden: torch.Tensor,
                        ctx_hidden: torch.Tensor, penalty_alpha: float) -> torch.Tensor:
    """Contrastive-search score of each candidate token (Su et al., 2022).

    top_probs (B, K): model confidence of the K candidates; cand_hidden (B, K, D): the
    decoder's last hidden state after each candidate; ctx_hidden (B, T, D): hidden states of
    the tokens generated so far. score = (1 - alpha) * p - alpha * max cosine(cand, ctx).
    """
    cand = F.normalize(cand_hidden.float(), dim=-1)
    ctx = F.normalize(ctx_hidden.float(), dim=-1)
    degeneration = torch.einsum("bkd,btd->bkt", cand, ctx).max(dim=-1).values
    return (1.0 - penalty_alpha) * top_probs.float() - penalty_alpha * degeneration


def _cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: `cache` in transformers 5.x (the name
    this file meets in a model directory may be an older release's `past_key_values`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def contrastive_search(model: T5ForConditionalGeneration, input_ids: torch.LongTensor,
                       attention_mask: torch.LongTensor, max_new_tokens: int,
                       penalty_alpha: float, top_k: int, streamer=None) -> torch.LongTensor:
    """Contrastive search for an encoder-decoder model, with a KV cache.

    Written here because transformers 5 moved contrastive search out of the library into a
    hub repository that `generate` downloads at run time, which cannot work offline.
    The decoder's cache holds batch * K rows (each prompt's K candidate rows share its
    prefix). Each step feeds only the K candidate tokens through the decoder, one position
    each, instead of the whole sequence; the winning candidate's row of the cache then
    replaces its K rows. The winner's output also gives the next step's logits and its
    hidden state joins the context, so there is one decoder call per step.
    """
    cfg = model.config
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    batch = input_ids.size(0)
    cache_arg = _cache_kwarg(model)
    encoder_hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    seq = torch.full((batch, 1), cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    if streamer is not None:
        streamer.put(seq.cpu())
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), attention_mask=attention_mask,
                decoder_input_ids=seq, output_hidden_states=True, use_cache=True)
    logits = out.logits[:, -1]
    ctx_hidden = out.decoder_hidden_states[-1]  # (B, T, D): the generated tokens' last hidden states
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(top_k)  # row b * K + k: candidate k of prompt b
    enc_k = BaseModelOutput(last_hidden_state=encoder_hidden.repeat_interleave(top_k, dim=0))
    mask_k = attention_mask.repeat_interleave(top_k, dim=0)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    rows = torch.arange(batch, device=input_ids.device)
    for _ in range(max_new_tokens):
        top_probs, top_ids = logits.float().softmax(dim=-1).topk(top_k, dim=-1)  # (B, K)
        out = model(encoder_outputs=enc_k, attention_mask=mask_k, decoder_input_ids=top_ids.reshape(-1, 1),
                    output_hidden_states=True, use_cache=True, **{cache_arg: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        hidden = out.decoder_hidden_states[-1].view(batch, top_k, -1)  # (B, K, D)
        scores = degeneration_scores(top_probs, hidden, ctx_hidden, penalty_alpha)
        best = scores.argmax(dim=-1)  # (B,)
        next_tokens = top_ids[rows, best]
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
        seq = torch.cat([seq, next_tokens[:, None]], dim=1)
        ctx_hidden = torch.cat([ctx_hidden, hidden[rows, best][:, None]], dim=1)
        logits = out.logits.view(batch, top_k, -1)[rows, best]
        # every candidate row of prompt b continues from the winner's row
        cache.reorder_cache((rows * top_k + best).repeat_interleave(top_k))
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        finished |= next_tokens == eos
        if bool(finished.all()):
            break
    if streamer is not None:
        streamer.end()
    return seq


TextToTextModelConfig.register_for_auto_class()
TextToTextModel.register_for_auto_class("AutoModelForSeq2SeqLM")
