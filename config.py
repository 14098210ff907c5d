"""Every setting of every stage, as dataclasses with the original project's names.

One config mechanism for the whole repository: each script parses the dataclass it
needs with `utils.cli.parse_config`, so any field can be overridden as `--field value`
(or `--field=value`) and `--help` lists them all with their defaults.

Every setting is checked when a config is made, from the command line or in code: the
rules below (settings.py) give a one-line error with the valid range, e.g.
`--ngram must be an integer >= 1, got 0`, before any work starts.

Paths default to locations under the project root, never the current directory, so a
script behaves the same wherever it is started from. Relative paths given on the command
line are resolved against the current directory as a user would expect.

Hand-off convention between stages: every training script writes the model it recommends
to the next stage (best by its validation metric, else the last) as a model directory at
`<output_dir>/best`, and its resumable checkpoints under `<output_dir>/checkpoints/`.
"""
from dataclasses import dataclass
from pathlib import Path

from settings import (SEED, Rule, Settings, at_least, fraction, in_range, matches, names_from,
                      non_negative, one_of, positive, unset_or_at_least)

PROJECT_ROOT = Path(__file__).resolve().parent
DATA_DIR = PROJECT_ROOT / "data"
MODEL_SAVE_DIR = PROJECT_ROOT / "model_save"


def _p(*parts: str) -> str:
    return str(PROJECT_ROOT.joinpath(*parts))


# --- Valid values of every setting, checked whenever a config is made (settings.py): a
# bad value is a one-line error naming the flag and the valid range, before any work. Each
# dataclass below names its rules on its class line. The choices are the one list each;
# the modules that act on them import them from here.

# the one table of precision names: name -> the torch dtype it computes in (model/harness.py)
MIXED_PRECISION = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # PyTorch's fused attention | transformers' matmul + softmax
# torch.compile backends: inductor generates kernels (the fast one, minutes to compile on a small
# CPU); aot_eager traces the same graphs, forward and backward, without generating code
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
OPTIMIZERS = ("adafactor", "adafactor_scaled", "adamw")
STREAMING = ("auto", "yes", "no")
SEARCH_TYPES = ("greedy", "beam", "sampling", "contrastive")  # model/modeling_chat_model.py ships its own copy
INPUT_FORMATS = ("auto", "belle", "wiki", "web_text_zh", "baike_qa", "prompt_response")
RESPONSE_OVERFLOW = ("cut", "drop")
# the embedded corpus's pretraining pairs (utils/embedded_corpus.py): the original's opening ->
# continuation; masked text -> the text (denoising, an option); or both in one training file
PRETRAIN_OBJECTIVES = ("continuation", "denoise", "mixed")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
T5_LINEAR_LAYERS = ("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1")  # what LoRA can adapt in T5's blocks
DEVICE = matches(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")


def _transformers_optimizer(name) -> bool:
    from transformers.training_args import OptimizerNames  # only DPO needs it, and imports it anyway

    return name in {o.value for o in OptimizerNames}


TRANSFORMERS_OPTIM = Rule(_transformers_optimizer, "a transformers optimizer name, e.g. adafactor, adamw_torch, "
                          "sgd (transformers.training_args.OptimizerNames lists them)")

_COUNT = at_least(1)
_STEPS = at_least(0)
_LIMIT = unset_or_at_least(1)
_SEQ = at_least(2, " (one token plus [EOS])")


def _adds_up(c) -> str:
    ratios = (c.train_ratio, c.valid_ratio, c.test_ratio)
    if abs(sum(ratios) - 1) > 1e-6:
        return (f"--train_ratio, --valid_ratio and --test_ratio must add up to 1, got "
                f"{' + '.join(map(str, ratios))} = {sum(ratios):g}")
    return ""


def _min_max(kind: str):
    def check(c) -> str:
        lo, hi = getattr(c, f"min_{kind}_len"), getattr(c, f"max_{kind}_len")
        return f"--min_{kind}_len ({lo}) must not exceed --max_{kind}_len ({hi})" if lo > hi else ""
    return check


_TRAIN_RULES = {
    "epochs": _COUNT, "batch_size_per_gpu": _COUNT, "learn_rate": positive(), "div_factor": _COUNT,
    "mixed_precision": one_of(*MIXED_PRECISION), "gradient_accumulation_steps": _COUNT, "warmup_steps": _STEPS,
    "max_steps": _LIMIT, "optimizer": one_of(*OPTIMIZERS), "logging_steps": _COUNT, "save_steps": _COUNT,
    "keep_latest_n_ckp": _COUNT, "seed": SEED, "dataloader_buffer_size": _COUNT, "streaming": one_of(*STREAMING),
    "max_seq_len": _SEQ, "eval_max_samples": unset_or_at_least(1, "all"),
    "attn_implementation": one_of(*ATTN_IMPLEMENTATIONS), "torch_compile_backend": one_of(*COMPILE_BACKENDS),
}

_SFT_RULES = {
    "max_seq_len": _SEQ, "batch_size": _COUNT, "num_train_epochs": _COUNT, "max_steps": _LIMIT,
    "save_steps": _COUNT, "gradient_accumulation_steps": _COUNT, "learning_rate": positive(),
    "logging_steps": _COUNT, "warmup_steps": _STEPS, "mixed_precision": one_of(*MIXED_PRECISION), "seed": SEED,
    "save_total_limit": at_least(0, " (0 = keep all)"), "optimizer": one_of(*OPTIMIZERS),
    "eval_max_samples": unset_or_at_least(1, "all"), "attn_implementation": one_of(*ATTN_IMPLEMENTATIONS),
    "torch_compile_backend": one_of(*COMPILE_BACKENDS),
}

_DPO_RULES = {
    "max_seq_len": _SEQ, "per_device_train_batch_size": _COUNT, "num_train_epochs": _COUNT, "max_steps": _LIMIT,
    "optim": TRANSFORMERS_OPTIM, "gradient_accumulation_steps": _COUNT, "learning_rate": positive(),
    "logging_steps": _COUNT, "save_steps": _COUNT, "save_total_limit": at_least(0, " (0 = keep all)"),
    "warmup_steps": _STEPS, "mixed_precision": one_of(*MIXED_PRECISION), "seed": SEED, "beta": positive(),
    "lora_r": _COUNT, "lora_alpha": _COUNT, "lora_dropout": fraction(high_open=True),
    "lora_target_modules": names_from(*T5_LINEAR_LAYERS), "eval_batch_size": _COUNT,
    "max_eval_pairs": unset_or_at_least(1, "all"), "attn_implementation": one_of(*ATTN_IMPLEMENTATIONS),
    "torch_compile_backend": one_of(*COMPILE_BACKENDS),
}

_DPO_DATA_RULES = {
    "eval_ratio": fraction(high_open=True), "eval_rows": unset_or_at_least(1, "use --eval_ratio"), "seed": SEED,
    "max_len": _COUNT, "max_rows": unset_or_at_least(1, "all"), "batch_size": _COUNT, "max_new_tokens": _COUNT,
    "max_seq_len": _SEQ, "search_type": one_of(*SEARCH_TYPES), "device": DEVICE,
}

_INFER_RULES = {
    "max_seq_len": _COUNT, "max_prompt_tokens": _SEQ, "mixed_precision": one_of(*MIXED_PRECISION), "device": DEVICE,
    "search_type": one_of(*SEARCH_TYPES), "port": in_range(1, 65535), "workers": _COUNT,
    "log_level": one_of(*LOG_LEVELS), "max_input_chars": _COUNT, "max_new_tokens_cap": _COUNT,
    "max_body_bytes": _COUNT, "max_connections": _COUNT, "header_timeout": positive(), "body_timeout": positive(),
    "keep_alive_timeout": _COUNT, "max_batch_size": _COUNT, "batch_wait_ms": non_negative(),
}

_DATA_PROCESS_RULES = {
    "input_format": one_of(*INPUT_FORMATS), "max_rows": unset_or_at_least(1, "all"), "seed": SEED,
    "min_prompt_len": at_least(0), "max_prompt_len": _COUNT, "min_response_len": at_least(0),
    "max_response_len": _COUNT, "response_overflow": one_of(*RESPONSE_OVERFLOW),
    # 1 itself admits no LSH banding (datasketch needs two bands); utils/dedup.py says so for
    # a --num_perm too small for the threshold
    "dedup_threshold": fraction(low_open=True, high_open=True), "num_perm": at_least(2), "ngram": _COUNT,
    "group_size": _COUNT, "index_cache_mb": positive(), "num_workers": at_least(0, " (0 = one per CPU)"),
    "train_ratio": fraction(), "valid_ratio": fraction(), "test_ratio": fraction(),
    "shuffle_bucket_mb": positive(), "demo_valid_ratio": fraction(high_open=True),
    "demo_test_ratio": fraction(high_open=True), "row_group_size": _COUNT, "bins": _COUNT,
    "pretrain_objective": one_of(*PRETRAIN_OBJECTIVES),
}
_DATA_PROCESS_CHECKS = (
    _adds_up, _min_max("prompt"), _min_max("response"),
    lambda c: "" if c.demo_valid_ratio + c.demo_test_ratio < 1 else
    f"--demo_valid_ratio + --demo_test_ratio must be < 1 (train keeps the rest), got "
    f"{c.demo_valid_ratio} + {c.demo_test_ratio}",
)


@dataclass
class TrainConfig(Settings, rules=_TRAIN_RULES):
    """Text-to-text pretraining with the project's accelerate trainer (train.py)."""
    epochs: int = 8
    batch_size_per_gpu: int = 16
    learn_rate: float = 0.0001
    div_factor: int = 50  # OneCycleLR peaks at learn_rate * div_factor
    mixed_precision: str = "bf16"  # "no" | "fp16" | "bf16"; forced to "no" on CPU
    gradient_accumulation_steps: int = 8
    warmup_steps: int = 1024
    max_steps: int = -1  # > 0: stop after this many optimiser steps
    optimizer: str = "adafactor"  # "adafactor" | "adafactor_scaled" (updates scaled by parameter RMS, T5's recipe) | "adamw"
    tokenizer_dir: str = _p("model_save", "tokenizer")  # not given + is_finetune: the model's own, when it has one
    model_config_file: str = _p("model_config.json")  # a fresh model; given: also the config of a .bin to fine-tune
    train_file: str = _p("data", "my_train_dataset.parquet")
    validation_file: str = _p("data", "my_valid_dataset.parquet")
    test_file: str = _p("data", "my_test_dataset.parquet")
    is_finetune: bool = False  # load finetune_from_ckp_file, freeze embedding + encoder
    finetune_from_ckp_file: str = _p("model_save", "pretrain", "best")
    is_keep_training: bool = False  # resume exactly from train_state_dir
    train_state_dir: str = ""  # where checkpoints are written and resumed from (as the original's model_save/train_latest_state); a checkpoint dir: resume from it; "" = <output_dir>/checkpoints
    output_dir: str = _p("model_save", "pretrain")
    overwrite_output_dir: bool = False  # a fresh run where an earlier run left checkpoints: remove that run's checkpoints and outputs (else an error)
    logging_steps: int = 50
    save_steps: int = 10000
    keep_latest_n_ckp: int = 8
    seed: int = 23333
    dataloader_buffer_size: int = 50000
    streaming: str = "auto"  # "auto" | "yes" | "no": iterable dataset instead of in-memory
    group_by_length: bool = False
    max_seq_len: int = 256
    eval_max_samples: int = -1  # > 0: evaluate BLEU on at most this many validation rows
    test_model_dir: str = ""  # `train.py test`: the model dir to score; "" = <output_dir>/best
    attn_implementation: str = "sdpa"  # "sdpa" (PyTorch's fused attention) | "eager" (transformers' matmul + softmax)
    torch_compile: bool = False  # torch.compile the training forward/backward (first steps compile: slower start)
    torch_compile_backend: str = "inductor"  # its backend, as TrainingArguments.torch_compile_backend


@dataclass
class SFTconfig(Settings, rules=_SFT_RULES):
    """Instruction fine-tuning with transformers' Seq2SeqTrainer (sft_train.py)."""
    max_seq_len: int = 384 + 8
    finetune_from_ckp_file: str = _p("model_save", "pretrain", "best")  # "": start from random weights
    model_config_file: str = _p("model_config.json")  # a fresh model when finetune_from_ckp_file is ""; given: the config of a .bin
    tokenizer_dir: str = _p("model_save", "tokenizer")  # not given: the model's own, when it has one
    sft_train_file: str = _p("data", "sft_train.parquet")
    sft_eval_file: str = ""
    batch_size: int = 12
    num_train_epochs: int = 4
    max_steps: int = -1
    save_steps: int = 5000
    gradient_accumulation_steps: int = 4
    learning_rate: float = 5e-5
    logging_first_step: bool = True
    logging_steps: int = 100
    output_dir: str = _p("model_save", "sft")
    warmup_steps: int = 100
    mixed_precision: str = "bf16"
    seed: int = 23333
    resume_from_checkpoint: str = ""  # a checkpoint dir, or "last"
    overwrite_output_dir: bool = False  # a fresh run where an earlier run left checkpoints: remove that run's checkpoints and outputs (else an error)
    per_sample_loss: bool = False  # weigh every pair equally (not every token): short answers learn as fast as long ones
    save_total_limit: int = 3  # checkpoints kept under <output_dir>/checkpoints (plus the best); 0 = all
    optimizer: str = "adamw"  # "adamw" | "adafactor" | "adafactor_scaled" (updates scaled by parameter RMS)
    group_by_length: bool = False  # batches of similar lengths: less padding, faster steps
    eval_max_samples: int = -1  # > 0: evaluate (loss, BLEU of greedy answers) on at most this many eval rows
    attn_implementation: str = "sdpa"  # "sdpa" | "eager"
    torch_compile: bool = False  # TrainingArguments.torch_compile
    torch_compile_backend: str = "inductor"  # TrainingArguments.torch_compile_backend


@dataclass
class DpoConfig(Settings, rules=_DPO_RULES):
    """DPO on the SFT model, the rejected side generated by the SFT model (dpo_train.py).

    `dpo_train.py [train]` trains (full DPO, or LoRA with --use_lora True), `merge` folds a
    LoRA adapter into the SFT model, `eval` scores a policy against the SFT reference.
    """
    max_seq_len: int = 512 + 8
    sft_model_file: str = _p("model_save", "sft", "best")  # the SFT model dir: policy start and reference
    tokenizer_dir: str = _p("model_save", "sft", "best")  # not given: sft_model_file's own, when it has one
    dpo_train_file: str = _p("data", "my_dpo_data.json")  # prompt/chosen/rejected JSON, JSONL or parquet
    dpo_eval_file: str = _p("data", "my_dpo_eval.json")  # "" or a missing file: no evaluation while training
    per_device_train_batch_size: int = 4
    num_train_epochs: int = 4
    max_steps: int = -1
    gradient_accumulation_steps: int = 8
    learning_rate: float = 1e-5
    logging_first_step: bool = True
    logging_steps: int = 20
    save_steps: int = 2000  # checkpoint (and evaluate, with an eval file) every this many steps
    save_total_limit: int = 3  # checkpoints kept under <output_dir>/checkpoints
    output_dir: str = _p("model_save", "dpo")  # writes <output_dir>/best, checkpoints/, train_loss.csv, eval.csv
    warmup_steps: int = 1000
    optim: str = "adafactor"  # any transformers optimizer name (the original: adafactor)
    mixed_precision: str = "bf16"  # on a GPU: "bf16" (fp16 where unsupported) | "fp16" | "no"; CPU: fp32
    seed: int = 23333
    beta: float = 0.1
    disable_dropout: bool = True  # dropout off in the policy so policy and reference log-probs agree
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_target_modules: str = "q,k,v,o"  # comma-separated T5 attention projections
    merged_output_dir: str = _p("model_save", "dpo_merged")
    adapter_dir: str = ""  # merge: the LoRA adapter; "" = <output_dir>/best
    resume_from_checkpoint: str = ""  # a checkpoint dir, or "last" (the latest under <output_dir>/checkpoints)
    overwrite_output_dir: bool = False  # a fresh run where an earlier run left checkpoints: remove that run's checkpoints and outputs (else an error)
    report_to: str = "none"  # also log to "tensorboard" etc.; the CSV log is always written
    model: str = ""  # eval: the policy, a model dir or a LoRA adapter dir; "" = <output_dir>/best
    eval_output_file: str = ""  # eval: the JSON report; "" = <output_dir>/preference_eval.json
    eval_batch_size: int = 8
    max_eval_pairs: int = -1  # eval: > 0 scores only the first N pairs
    precompute_ref_log_probs: bool = False  # score every pair with the frozen reference once, before training
    attn_implementation: str = "sdpa"  # "sdpa" | "eager"
    torch_compile: bool = False  # TrainingArguments.torch_compile
    torch_compile_backend: str = "inductor"  # TrainingArguments.torch_compile_backend


@dataclass
class DpoDataConfig(Settings, rules=_DPO_DATA_RULES):
    """Preference data for DPO: python -m utils.dpo_data_process (rejected = the SFT model's answer)."""
    instruction_file: str = _p("data", "alpaca_gpt4_data_zh.json")  # parquet prompt/response or alpaca JSON; "" = none
    preference_files: str = ""  # comma-separated prompt/chosen/rejected files (JSON, JSONL, parquet) merged in
    sft_model_dir: str = _p("model_save", "sft", "best")  # generates the rejected answers
    train_file: str = _p("data", "my_dpo_data.json")  # a .parquet copy is written next to each JSON
    eval_file: str = _p("data", "my_dpo_eval.json")
    eval_ratio: float = 0.01  # share of pairs held out (the original: 1%)
    eval_rows: int = -1  # > 0: hold out exactly this many pairs instead
    write_parquet: bool = True
    seed: int = 23333
    max_len: int = 512  # pairs whose prompt, chosen or rejected is longer (characters) are dropped
    max_rows: int = -1  # > 0: rows taken from each input file
    batch_size: int = 32  # prompts generated together
    max_new_tokens: int = 320
    max_seq_len: int = 512 + 8  # prompt tokens fed to the encoder
    search_type: str = "greedy"  # greedy | beam | sampling | contrastive
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    partial_file: str = ""  # append-only generation log; "" = <train_file>.rejected.partial.jsonl
    restart: bool = False  # discard a partial file from earlier settings instead of refusing
    unescape_newlines: bool = True  # turn literal "\\n" in preference files into line breaks (as the original)


@dataclass
class InferConfig(Settings, rules=_INFER_RULES):
    """Chat CLI (cli_demo.py) and HTTP API (api_demo.py)."""
    max_seq_len: int = 320  # the longest answer, in tokens (the original's 回答的最大长度); a request's max_tokens overrides it
    max_prompt_tokens: int = 320  # the question's tokens fed to the model, [EOS] included; a longer one is cut at the end
    mixed_precision: str = "bf16"  # on a GPU: "bf16" (fp16 where bf16 is unsupported) | "fp16" | "no"; CPU: fp32
    model_dir: str = _p("model_save", "final")  # a model directory, .safetensors or legacy .bin file; not given: this, else model_save/ itself
    tokenizer_dir: str = ""  # "": the model directory (or the directory holding the model file), else model_save/tokenizer
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU) | "cuda" | "cuda:1" | "mps" | "cpu"
    stream: bool = True  # cli_demo: stream the answer; False waits for it behind a spinner
    search_type: str = "greedy"  # non-streamed answers (cli --stream False, /api/chat): greedy|beam|sampling|contrastive
    api_key: str = ""  # non-empty: requests need "Authorization: Bearer <api_key>" (or CHATLM_API_KEY, api_key_file)
    api_key_file: str = ""  # a file holding the key (kept out of `ps`, unlike --api_key)
    host: str = "127.0.0.1"
    port: int = 8812
    reload: bool = False
    workers: int = 1  # > 1: each worker process loads its own copy of the model
    log_level: str = "info"
    model_name: str = "chatlm-mini-chinese"  # the model id the OpenAI-compatible API reports
    max_input_chars: int = 2048  # longer questions get 400
    max_new_tokens_cap: int = 1024  # larger max_tokens gets 400
    max_body_bytes: int = 65536  # larger request bodies get 413
    max_connections: int = 64  # open connections beyond this are closed at once; requests beyond it get 503
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers, else closed
    body_timeout: float = 30.0  # seconds a request may take to send its body, else 408
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection stays open
    max_batch_size: int = 8  # concurrent answers generated together (model/infer.py Batcher)
    batch_wait_ms: float = 20.0  # a batch waits this long after its first request for others to join


@dataclass
class DataProcessConfig(Settings, rules=_DATA_PROCESS_RULES, checks=_DATA_PROCESS_CHECKS):
    """The data pipeline: python -m utils.raw_data_process {demo|clean|dedup|split|to_text|stats}."""
    input: str = ""  # clean/dedup/split/to_text/stats: the input file
    output: str = ""  # clean/dedup: parquet; to_text: .txt; stats: .png
    output_dir: str = ""  # demo: default data/demo; split: default data/
    input_format: str = "auto"  # auto | belle | wiki | web_text_zh | baike_qa | prompt_response
    max_rows: int = -1  # > 0: demo: rows taken from each source file; others: rows read from the input
    seed: int = 23333
    min_prompt_len: int = 2
    max_prompt_len: int = 320  # longer prompts are dropped
    min_response_len: int = 2
    max_response_len: int = 320  # longer responses are cut at a sentence end, or dropped
    response_overflow: str = "cut"  # "cut" | "drop"
    keep_translation: bool = False  # clean, BELLE input: keep translation tasks (the original drops them)
    keep_tables: bool = False  # clean, BELLE input: keep table tasks (表格, or "-----" in prompt or response)
    dedup_threshold: float = 0.85  # MinHash Jaccard estimate at which a row is a near-duplicate
    num_perm: int = 256
    ngram: int = 3  # character n-gram shingles
    group_size: int = 5000  # rows sketched together by the de-duplicator
    index_dir: str = ""  # dedup: where its scratch index (SQLite, deleted at the end) goes; "" = beside --output
    index_cache_mb: float = 64  # dedup: RAM for the index's page cache; the index itself is on disk
    num_workers: int = 0  # clean/dedup: worker processes; 0 = one per CPU, 1 = all in this process
    train_ratio: float = 0.91
    valid_ratio: float = 0.0025
    test_ratio: float = 0.0875
    split_names: str = "my_train_dataset,my_valid_dataset,my_test_dataset"  # split: output file stems
    shuffle_bucket_mb: float = 256  # split: shuffle in buckets of about this many MB of input
    demo_valid_ratio: float = 0.02  # demo: share of source paragraphs/reviews held out for valid
    demo_test_ratio: float = 0.08  # demo: ... and for test
    # demo: what pretrain_train.parquet holds: continuation (the original's objective: opening ->
    # continuation) | denoise (text with 15% of its characters masked -> the text) | mixed (both);
    # pretrain_valid/test.parquet are continuation pairs whichever is chosen. denoise command:
    # mixed keeps each input pair beside its denoising pairs
    pretrain_objective: str = "continuation"
    row_group_size: int = 50000
    bins: int = 50  # stats: histogram bins
