"""The one save/load path of the project for models and tokenizers.

    from model.chat_model import TextToTextModel, build_model, load_model, save_model

- `build_model(config_file)`: a randomly initialised model from a T5 config JSON
  (model_config.json for the 0.2B model, model_config_tiny.json for CPU runs).
- `load_model(path)`: a model directory written by `save_model` (or by any
  `save_pretrained`), a `.safetensors` file, or a legacy `.bin` state dict (read with
  `torch.load(weights_only=True)`; nothing unpickles arbitrary objects). Loading is strict:
  a missing or unexpected weight is an error, never a silently random layer.
- `save_model(model, out_dir, tokenizer)`: the Hugging Face directory the original
  shipped (config.json, configuration_chat_model.py, generation_config.json,
  model.safetensors, modeling_chat_model.py, tokenizer files), written atomically: into a
  temporary sibling directory first, then renamed, so a kill mid-save never leaves a
  half-written model where a later stage would read it.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from utils.cli import UserError

from .configuration_chat_model import TextToTextModelConfig
from .modeling_chat_model import SEARCH_TYPES, TextToTextModel  # noqa: F401 (re-export)

# transformers 5.15+ runs T5 attention (relative position bias as an additive mask) through
# PyTorch's scaled_dot_product_attention ("sdpa"), its default for T5 in 5.25;
# "eager" is transformers' own matmul + softmax. Same results (tests/test_model.py).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
MODEL_FILES = ("config.json", "configuration_chat_model.py", "generation_config.json",
               "model.safetensors", "modeling_chat_model.py")


def load_model_config(config_file: str | Path, vocab_size: int | None = None) -> TextToTextModelConfig:
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"model config file not found: {path}")
    try:
        config = TextToTextModelConfig.from_json_file(str(path))
    except (ValueError, json.JSONDecodeError) as exc:
        raise UserError(f"model config file is not valid JSON: {path} ({exc})") from None
    if config.d_model != config.num_heads * config.d_kv:
        raise UserError(f"{path}: d_model ({config.d_model}) must equal num_heads * d_kv "
                        f"({config.num_heads} * {config.d_kv})")
    if vocab_size is not None:
        config.vocab_size = vocab_size
    config.decoder_start_token_id = config.pad_token_id
    return config


def build_model(config_file: str | Path, vocab_size: int | None = None) -> TextToTextModel:
    return TextToTextModel(load_model_config(config_file, vocab_size))


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (a tied embedding/LM head counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _check_keys(missing, unexpected, source) -> None:
    # The LM head is tied to the shared embedding; it is never stored separately.
    missing = [k for k in missing if k not in ("lm_head.weight", "encoder.embed_tokens.weight",
                                               "decoder.embed_tokens.weight")]
    if missing or unexpected:
        raise UserError(f"weights in {source} do not match the model: "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {list(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}")


def load_model(path: str | Path, config_file: str | Path | None = None,
               dtype: torch.dtype | None = None) -> TextToTextModel:
    """Load a model directory, a .safetensors file or a legacy .bin state dict, strictly."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"not a model directory (no config.json): {path}")
        if not any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin",
                                                         "model.safetensors.index.json")):
            raise UserError(f"model directory has no weights (model.safetensors): {path}")
        model, info = TextToTextModel.from_pretrained(str(path), output_loading_info=True, dtype=dtype)
        _check_keys(info.get("missing_keys", []), info.get("unexpected_keys", []), path)
        return model
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    config_path = Path(config_file) if config_file else path.parent / "config.json"
    model = TextToTextModel(load_model_config(config_path))
    if path.suffix == ".safetensors":
        state = load_safetensors(str(path))
    elif path.suffix == ".bin":
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"{path} holds pickled objects other than tensors; refusing to unpickle it "
                            f"({str(exc).splitlines()[0]})") from None
    else:
        raise UserError(f"unknown model file type {path.suffix!r} (expected a directory, .safetensors or .bin): {path}")
    state = {k.removeprefix("model."): v for k, v in state.items()}  # original wrapper's prefix
    result = model.load_state_dict(state, strict=False)
    _check_keys(result.missing_keys, result.unexpected_keys, path)
    model.tie_weights()
    return model.to(dtype) if dtype is not None else model


def save_model(model: torch.nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face model directory, atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp)
        _fsync_tree(tmp)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing `dst`; at every instant one complete copy exists."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def write_tokenizer_files(tokenizer, out_dir: str | Path) -> None:
    """`tokenizer.save_pretrained` plus the two details that keep older readers working.

    transformers 5 writes `tokenizer_class: TokenizersBackend` and no special_tokens_map.json;
    transformers 4 (and the original project's own code) needs `PreTrainedTokenizerFast`
    and the map, and transformers 5 reads both as well.
    """
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                   "cls_token", "mask_token") if cfg.get(k)}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=2),
                                                      encoding="utf-8")


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"no tokenizer found in {path} (train one with train_tokenizer.py)")
    return AutoTokenizer.from_pretrained(str(path))


def check_vocab(tokenizer, model_config, where: str = "") -> None:
    if len(tokenizer) > model_config.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{model_config.vocab_size}{' (' + where + ')' if where else ''}: "
                        "retrain the tokenizer with a smaller --vocab_size or use a matching model config")
