"""The one save/load path of the project for models and tokenizers.

    from model.chat_model import TextToTextModel, build_model, load_model, save_model

- `build_model(config_file)`: a randomly initialised model from a T5 config JSON
  (model_config.json for the 0.2B model, model_config_tiny.json for CPU runs).
- `load_model(path)`: a model directory written by `save_model` (or by any
  `save_pretrained`), a `.safetensors` file, or a legacy `.bin` state dict (read with
  `torch.load(weights_only=True)`; nothing unpickles arbitrary objects). A weights file's
  config is `config_file` when given, else config.json beside it, else the original
  trainer's model_config.json beside it. Loading is strict: a missing or unexpected weight
  is an error, never a silently random layer. The weights always load into this project's
  classes: Python files inside a model directory are never run.
- `save_model(model, out_dir, tokenizer)`: the Hugging Face directory the original
  shipped (config.json, configuration_chat_model.py, generation_config.json,
  model.safetensors, modeling_chat_model.py, tokenizer files), written atomically: into a
  temporary sibling directory first, then renamed, so a kill mid-save never leaves a
  half-written model where a later stage would read it. The configs are written clean:
  `use_cache` on (training turns it off) and no load-time keys in tokenizer_config.json,
  so a copied directory loads and generates the same anywhere.
- `replace_dir(src, dst)`: the one atomic directory replacement (models, tokenizers, LoRA
  adapters). It replaces `dst` only when the project wrote it: a directory carrying the
  marker file `OUTPUT_MARKER` (written into every directory it installs, listing its files),
  or one holding only files of the known model/tokenizer set, and only with what it holds (a
  tokenizer never replaces a model). Anything else (a user's directory, a file, a model where a
  tokenizer is written) is a one-line error naming it, and nothing is touched.
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

from model.common import UserError

from transformers.utils import logging as hf_logging

from .configuration_chat_model import TextToTextModelConfig
from .modeling_chat_model import SEARCH_TYPES, TextToTextModel  # noqa: F401 (re-export)

# transformers 5 draws a progress bar for every load and save ("Loading weights", "Writing
# model shards") of what is here one local file read or written in milliseconds: 22 such
# bars in one quickstart's stage logs, between the training lines. Off for every script that
# loads or saves through this module (the Trainer's own step bar is not affected).
hf_logging.disable_progress_bar()

# transformers 5.15+ runs T5 attention (relative position bias as an additive mask) through
# PyTorch's scaled_dot_product_attention ("sdpa"), its default for T5 in 5.25;
# "eager" is transformers' own matmul + softmax. Same results (tests/test_model.py).
MODEL_FILES = ("config.json", "configuration_chat_model.py", "generation_config.json",
               "model.safetensors", "modeling_chat_model.py")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
# The original's trainer writes the config of its .bin state dicts under this name.
ORIGINAL_CONFIG_NAME = "model_config.json"
# Keys transformers 5 stores in tokenizer_config.json that describe how it was loaded here
# (from a local folder, offline), not the tokenizer: copied elsewhere they would be wrong.
LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only", "cache_dir", "force_download", "token",
                            "revision", "subfolder", "trust_remote_code", "_commit_hash")
OUTPUT_MARKER = ".chatlm_output.json"
# What a model, tokenizer or adapter directory of this project or the original's holds: such a
# directory without the marker (written before the marker existed) may still be replaced.
KNOWN_OUTPUT_FILES = frozenset(MODEL_FILES) | frozenset(WEIGHT_FILES) | {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", ORIGINAL_CONFIG_NAME, "adapter_config.json",
    "adapter_model.safetensors", "adapter_model.bin", "README.md", OUTPUT_MARKER}


MODEL_DIMENSIONS = ("d_ff", "d_model", "num_heads", "d_kv", "num_layers", "num_decoder_layers")


def load_model_config(config_file: str | Path, vocab_size: int | None = None) -> TextToTextModelConfig:
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"model config file not found: {path}")
    try:
        config = TextToTextModelConfig.from_json_file(str(path))
    except (ValueError, json.JSONDecodeError) as exc:
        raise UserError(f"model config file is not valid JSON: {path} ({exc}); fix or replace it") from None
    except TypeError as exc:  # valid JSON that is not an object of settings
        raise UserError(f"model config file is not a JSON object of settings: {path} ({exc}); "
                        "fix or replace it") from None
    # The model's dimensions come from this file only (the original's config.T5ModelConfig
    # was never read here and is gone); each must be a whole number of at least 1.
    bad = [f"{k} = {getattr(config, k)!r}" for k in MODEL_DIMENSIONS
           if not (isinstance(getattr(config, k), int) and getattr(config, k) >= 1)]
    if bad:
        raise UserError(f"{path}: {', '.join(bad)}; each of {', '.join(MODEL_DIMENSIONS)} must be an integer >= 1")
    if config.d_model != config.num_heads * config.d_kv:
        raise UserError(f"{path}: d_model ({config.d_model}) must equal num_heads * d_kv "
                        f"({config.num_heads} * {config.d_kv})")
    if vocab_size is not None:
        config.vocab_size = vocab_size
    config.decoder_start_token_id = config.pad_token_id
    return config


DAMAGED_HINT = "save, copy or download the model again"


def check_safetensors(path: Path) -> None:
    """A truncated or corrupt .safetensors file is a one-line error naming it (safetensors
    checks that the header is whole and that the tensors cover the file exactly)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is damaged or truncated ({str(exc).splitlines()[0]}): {DAMAGED_HINT}") from None


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


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def weights_config_file(weights: Path, config_file: str | Path | None = None) -> Path:
    """The config of a weights file: `config_file` when given, else config.json beside it,
    else model_config.json beside it (what the original's train.py writes next to its .bin)."""
    if config_file:
        return Path(config_file)
    for name in ("config.json", ORIGINAL_CONFIG_NAME):
        if (weights.parent / name).is_file():
            return weights.parent / name
    raise UserError(f"no model config beside {weights} (config.json, or the original's {ORIGINAL_CONFIG_NAME}): "
                    "pass --model_config_file")


def load_model(path: str | Path, config_file: str | Path | None = None,
               dtype: torch.dtype | None = None) -> TextToTextModel:
    """Load a model directory, a .safetensors file or a legacy .bin state dict, strictly.

    `config_file` is used for a weights file only (a directory carries its config.json).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"not a model directory (no config.json): {path}")
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise UserError(f"model directory has no weights (model.safetensors): {path}")
        load_model_config(path / "config.json")  # a broken config.json: one line naming it
        if (path / "model.safetensors").is_file():
            check_safetensors(path / "model.safetensors")
        model, info = TextToTextModel.from_pretrained(str(path), output_loading_info=True, dtype=dtype)
        _check_keys(info.get("missing_keys", []), info.get("unexpected_keys", []), path)
        return model
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    model = TextToTextModel(load_model_config(weights_config_file(path, config_file)))
    if path.suffix == ".safetensors":
        check_safetensors(path)
        state = load_safetensors(str(path))
    elif path.suffix == ".bin":
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"{path} holds pickled objects other than tensors; refusing to unpickle it "
                            f"({str(exc).splitlines()[0]})") from None
        except (RuntimeError, EOFError) as exc:  # torch's errors for a truncated or corrupt archive
            raise UserError(f"{path} is damaged or truncated ({str(exc).splitlines()[0]}): {DAMAGED_HINT}") from None
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
    use_cache = model.config.use_cache
    if tokenizer is not None:
        fill_special_token_ids(model, tokenizer)  # configs that agree with the tokenizer written beside them
    try:
        model.config.use_cache = True  # off while training; the saved model generates with the cache
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp)
        _fsync_tree(tmp)
        replace_dir(tmp, out_dir)
    finally:
        model.config.use_cache = use_cache
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def output_kind(directory: Path) -> str | None:
    """What a project (or original) output directory holds: "LoRA adapter", "model", "tokenizer"
    or None (none of these), by its files; an adapter or a model directory holds tokenizer files too."""
    names = {p.name for p in directory.iterdir()}
    if "adapter_config.json" in names:
        return "LoRA adapter"
    if names & {*WEIGHT_FILES, "config.json", ORIGINAL_CONFIG_NAME}:
        return "model"
    if "tokenizer.json" in names or "tokenizer.model" in names:
        return "tokenizer"
    return None


def check_replaceable(dst: str | Path, kind: str | None = None) -> None:
    """A UserError unless `dst` is absent, or a directory this project wrote (see the module doc)
    that holds nothing of another kind than `kind` (when given): both a tokenizer and a model
    are the project's, but `train_tokenizer.py --output_dir model_save/sft/best` must not
    delete the model there."""
    dst = Path(dst)
    if not dst.exists() and not dst.is_symlink():
        return
    if dst.is_symlink() or not dst.is_dir():
        raise UserError(f"output {dst} exists and is not a directory this project wrote: refusing to replace it "
                        "(choose another output directory, or move it away)")
    written = set(KNOWN_OUTPUT_FILES)
    try:
        written |= set(json.loads((dst / OUTPUT_MARKER).read_text(encoding="utf-8")).get("files", []))
    except (OSError, ValueError, AttributeError):
        pass  # no (readable) marker: only the known file set counts
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in dst.iterdir()
                     if p.name not in written or not p.is_file() or p.is_symlink())
    if foreign:
        raise UserError(f"output directory {dst} holds files this project did not write "
                        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): refusing to replace it "
                        "(choose another output directory, or move those files away)")
    held = output_kind(dst)
    if kind and held and held != kind:
        raise UserError(f"output directory {dst} holds a {held}: a {kind} written there would replace it "
                        "(choose another output directory, or move it away)")


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing `dst`; at every instant one complete copy exists.

    `dst` is replaced only when check_replaceable allows it (a directory of the project holding
    what `src` holds, or nothing); `src` gets the marker first.
    """
    src, dst = Path(src), Path(dst)
    check_replaceable(dst, output_kind(src))
    files = sorted(p.name for p in src.iterdir()) + [OUTPUT_MARKER]
    (src / OUTPUT_MARKER).write_text(json.dumps({"written_by": "ChatLM-mini-Chinese", "files": files}, indent=1),
                                     encoding="utf-8")
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
    """`tokenizer.save_pretrained` plus the details that keep other readers working.

    transformers 5 writes `tokenizer_class: TokenizersBackend` and no special_tokens_map.json;
    transformers 4 (and the original project's own code) needs `PreTrainedTokenizerFast`
    and the map, and transformers 5 reads both as well. Load-time keys are left out.
    """
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in LOAD_TIME_TOKENIZER_KEYS:
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                   "cls_token", "mask_token") if cfg.get(k)}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=2),
                                                      encoding="utf-8")


def needs_space_cleanup(tokenizer) -> bool:
    """Whether decoding puts a space before every piece, as tokenizers trained with the original's settings do.

    The original trained with Metaspace's default prepend scheme ("always": a "▁" before every
    pre-token, punctuation included), so `你好, 世界。` decodes as `你好 , 世界 。`, and it
    decoded with clean_up_tokenization_spaces=True (transformers 4's default, saved in its
    tokenizer_config.json) to take the space before , . ? ! and English contractions out
    again. Ours use prepend scheme "never" and need nothing.
    """
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    for step in decoder.get("decoders", [decoder]):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme")  # tokenizers < 0.15 wrote add_prefix_space instead
            if scheme in ("always", "first") or (scheme is None and step.get("add_prefix_space", True)):
                return True
    return bool(tokenizer.clean_up_tokenization_spaces)


def restore_original_cleanup(tokenizer) -> bool:
    """Turn transformers 4's decode clean-up back on for tokenizers that need it (see above).

    transformers 5 skips the clean-up for BPE tokenizers even when asked, unless
    `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` is set; for
    these tokenizers the clean-up is what the original applied, so it is set here (the
    same `clean_up_tokenization` function, not a rewrite of it). Returns whether it is on.
    """
    if not needs_space_cleanup(tokenizer):
        return False
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return True


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"no tokenizer found in {path} (train one with train_tokenizer.py)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # json's, the tokenizers library's and transformers' errors for damaged files
        if (path / "config.json").is_file():  # transformers reads a model's config.json beside a tokenizer too
            load_model_config(path / "config.json")  # names config.json if that is the damaged file
        raise UserError(f"cannot read the tokenizer in {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                        "its files are damaged; copy them again or retrain with train_tokenizer.py") from None
    restore_original_cleanup(tokenizer)  # an original-style tokenizer decodes as it did there
    return tokenizer


def load_model_and_tokenizer(model_path: str | Path, tokenizer_dir: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) checked against each other. The model loads first: when both are
    missing, the model path the user gave is the mistake to name, not a tokenizer looked for
    beside it or in model_save/tokenizer."""
    model = load_model(model_path, dtype=dtype)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab(tokenizer, model.config, str(model_path))
    return model, tokenizer


def fill_special_token_ids(model, tokenizer) -> None:
    """Give the model's config and generation config the tokenizer's [BOS] id where they have
    none. T5 never uses it (decoding starts from [PAD]), but the HF Trainer fills it in itself
    and says so in a warning at every run ("The tokenizer has new PAD/BOS/EOS tokens that
    differ from the model config ..."). A differing id is left for the Trainer to report."""
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "bos_token_id", None) is None:
            config.bos_token_id = tokenizer.bos_token_id


def check_vocab(tokenizer, model_config, where: str = "") -> None:
    if len(tokenizer) > model_config.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{model_config.vocab_size}{' (' + where + ')' if where else ''}: "
                        "retrain the tokenizer with a smaller --vocab_size or use a matching model config")
