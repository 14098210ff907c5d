"""Every setting of every stage, as dataclasses with the original project's names.

One config mechanism for the whole repository: each script parses the dataclass it
needs with `utils.cli.parse_config`, so any field can be overridden as `--field value`
(or `--field=value`) and `--help` lists them all with their defaults.

Paths default to locations under the project root, never the current directory, so a
script behaves the same wherever it is started from. Relative paths given on the command
line are resolved against the current directory as a user would expect.

Hand-off convention between stages: every training script writes the model it recommends
to the next stage (best by its validation metric, else the last) as a model directory at
`<output_dir>/best`, and its resumable checkpoints under `<output_dir>/checkpoints/`.
"""
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent
DATA_DIR = PROJECT_ROOT / "data"
MODEL_SAVE_DIR = PROJECT_ROOT / "model_save"


def _p(*parts: str) -> str:
    return str(PROJECT_ROOT.joinpath(*parts))


@dataclass
class T5ModelConfig:
    """The published 0.2B architecture (model_config.json holds the same numbers)."""
    d_ff: int = 3072
    d_model: int = 768
    num_heads: int = 12
    d_kv: int = 64
    num_decoder_layers: int = 10
    num_layers: int = 10


@dataclass
class TrainConfig:
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
    tokenizer_dir: str = _p("model_save", "tokenizer")
    model_config_file: str = _p("model_config.json")
    train_file: str = _p("data", "my_train_dataset.parquet")
    validation_file: str = _p("data", "my_valid_dataset.parquet")
    test_file: str = _p("data", "my_test_dataset.parquet")
    is_finetune: bool = False  # load finetune_from_ckp_file, freeze embedding + encoder
    finetune_from_ckp_file: str = _p("model_save", "pretrain", "best")
    is_keep_training: bool = False  # resume exactly from train_state_dir
    train_state_dir: str = ""  # a checkpoint dir; "" = the latest under <output_dir>/checkpoints
    output_dir: str = _p("model_save", "pretrain")
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


@dataclass
class SFTconfig:
    """Instruction fine-tuning with transformers' Seq2SeqTrainer (sft_train.py)."""
    max_seq_len: int = 384 + 8
    finetune_from_ckp_file: str = _p("model_save", "pretrain", "best")  # "": start from random weights
    model_config_file: str = _p("model_config.json")  # used only when finetune_from_ckp_file is ""
    tokenizer_dir: str = _p("model_save", "tokenizer")
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
    per_sample_loss: bool = False  # weigh every pair equally (not every token): short answers learn as fast as long ones
    save_total_limit: int = 3  # checkpoints kept under <output_dir>/checkpoints (plus the best); 0 = all
    optimizer: str = "adamw"  # "adamw" | "adafactor" | "adafactor_scaled" (updates scaled by parameter RMS)
    group_by_length: bool = False  # batches of similar lengths: less padding, faster steps
    eval_max_samples: int = -1  # > 0: evaluate (loss, BLEU of greedy answers) on at most this many eval rows
    attn_implementation: str = "sdpa"  # "sdpa" | "eager"
    torch_compile: bool = False  # TrainingArguments.torch_compile


@dataclass
class DpoConfig:
    """DPO on the SFT model, the rejected side generated by the SFT model (dpo_train.py).

    `dpo_train.py [train]` trains (full DPO, or LoRA with --use_lora True), `merge` folds a
    LoRA adapter into the SFT model, `eval` scores a policy against the SFT reference.
    """
    max_seq_len: int = 512 + 8
    sft_model_file: str = _p("model_save", "sft", "best")  # the SFT model dir: policy start and reference
    tokenizer_dir: str = _p("model_save", "sft", "best")
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
    output_dir: str = _p("model_save", "dpo")  # writes <output_dir>/best, checkpoints/, dpo_log.csv
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
    report_to: str = "none"  # also log to "tensorboard" etc.; the CSV log is always written
    model: str = ""  # eval: the policy, a model dir or a LoRA adapter dir; "" = <output_dir>/best
    eval_output_file: str = ""  # eval: the JSON report; "" = <output_dir>/preference_eval.json
    eval_batch_size: int = 8
    max_eval_pairs: int = -1  # eval: > 0 scores only the first N pairs
    precompute_ref_log_probs: bool = False  # score every pair with the frozen reference once, before training
    attn_implementation: str = "sdpa"  # "sdpa" | "eager"
    torch_compile: bool = False  # TrainingArguments.torch_compile


@dataclass
class DpoDataConfig:
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
class InferConfig:
    """Chat CLI (cli_demo.py) and HTTP API (api_demo.py)."""
    max_seq_len: int = 320  # default number of new tokens of an answer
    mixed_precision: str = "bf16"  # on a GPU: "bf16" (fp16 where bf16 is unsupported) | "fp16" | "no"; CPU: fp32
    model_dir: str = _p("model_save", "final")  # a model directory, .safetensors or legacy .bin file
    tokenizer_dir: str = ""  # "": the model directory (or the directory holding the model file)
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU) | "cuda" | "cuda:1" | "mps" | "cpu"
    stream: bool = True  # cli_demo: stream the answer; False waits for it behind a spinner
    search_type: str = "greedy"  # non-streamed answers (cli --stream False, /api/chat): greedy|beam|sampling|contrastive
    api_key: str = ""  # non-empty: requests need "Authorization: Bearer <api_key>"
    host: str = "127.0.0.1"
    port: int = 8812
    reload: bool = False
    workers: int = 1  # > 1: each worker process loads its own copy of the model
    log_level: str = "info"
    model_name: str = "chatlm-mini-chinese"  # the model id the OpenAI-compatible API reports
    max_input_chars: int = 2048  # longer questions get 400
    max_new_tokens_cap: int = 1024  # larger max_tokens gets 400
    max_body_bytes: int = 65536  # larger request bodies get 413


@dataclass
class DataProcessConfig:
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
    row_group_size: int = 50000
    bins: int = 50  # stats: histogram bins
