"""The chat model: published size, the saved file set, fresh-process loading through the
Auto classes with the original README's snippet, every search type, strict loading."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY_CONFIG
from model.chat_model import (MODEL_FILES, TextToTextModel, build_model, count_parameters, load_model,
                              load_model_config, load_tokenizer, save_model)
from model.modeling_chat_model import SEARCH_TYPES, contrastive_search, degeneration_scores
from utils.cli import UserError


def test_published_config_has_the_published_size():
    config = load_model_config(ROOT / "model_config.json")
    with torch.device("meta"):
        model = TextToTextModel(config)
    assert (config.d_model, config.d_ff, config.num_heads, config.d_kv) == (768, 3072, 12, 64)
    assert (config.num_layers, config.num_decoder_layers, config.vocab_size) == (10, 10, 29298)
    assert model.lm_head.weight is model.shared.weight
    assert count_parameters(model) == 187_692_288
    assert count_parameters(model) + model.lm_head.weight.numel() == 210_193_152


@pytest.mark.parametrize("change,named", [({"num_layers": 0}, "num_layers = 0"), ({"d_ff": -1}, "d_ff = -1")])
def test_model_dimensions_below_one_are_one_line_errors(tmp_path, change, named):
    """model_config.json is the one place the model's dimensions come from (config.T5ModelConfig,
    never read, is gone); the rule its table had (each at least 1) is checked on the file."""
    config = json.loads((ROOT / "model_config.json").read_text(encoding="utf-8"))
    bad = tmp_path / "model_config.json"
    bad.write_text(json.dumps({**config, **change}), encoding="utf-8")
    with pytest.raises(UserError, match=f"{bad}: {named}; each of d_ff, .* must be an integer >= 1"):
        load_model_config(bad)


def test_saved_directory_has_the_original_file_set(tiny_model_dir):
    names = set(os.listdir(tiny_model_dir))
    expected = set(MODEL_FILES) | {"special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_chat_model.TextToTextModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_chat_model.TextToTextModelConfig"


ORIGINAL_SNIPPET = textwrap.dedent("""
    from transformers import AutoTokenizer, AutoModelForSeq2SeqLM
    import torch

    model_id = MODEL_DIR
    device = torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_id, trust_remote_code=True).to(device)

    txt = '如何评价Apple这家公司？'

    encode_ids = tokenizer([txt])
    input_ids, attention_mask = torch.LongTensor(encode_ids['input_ids']), torch.LongTensor(encode_ids['attention_mask'])

    outs = model.my_generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_seq_len=256,
        search_type='beam',
    )

    outs_txt = tokenizer.batch_decode(outs.cpu().numpy(), skip_special_tokens=True, clean_up_tokenization_spaces=True)
    print(outs_txt[0])
""")


def test_original_readme_snippet_runs_in_a_fresh_process(tiny_model_dir, tmp_path):
    """The original README's usage code, unchanged but for the model id, in a process that
    cannot import this project (other cwd, no PYTHONPATH)."""
    # A random model rarely emits [EOS], so the snippet's 256-token beam search would run to
    # the end; a large [EOS] embedding makes its logit dominate (with either sign) and the
    # answer end after a few tokens. Behaviour under test is loading, not answer quality.
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.shared.weight[1] *= 200.0
    model_dir = tmp_path / "eos_prone_model"
    save_model(model, model_dir, load_tokenizer(tiny_model_dir))
    check = ORIGINAL_SNIPPET + textwrap.dedent("""
        import sys
        assert 'model' not in sys.modules and 'config' not in sys.modules
        assert type(model).__name__ == 'TextToTextModel', type(model)
        for search_type in ['greedy', 'beam', 'sampling', 'contrastive']:
            o = model.my_generate(input_ids=input_ids, attention_mask=attention_mask, max_seq_len=6, search_type=search_type)
            assert o.shape[0] == 1 and 2 <= o.shape[1] <= 7 and o[0, 0].item() == 0, (search_type, o)
        print('SNIPPET-OK')
    """)
    script = tmp_path / "snippet.py"
    script.write_text(f"MODEL_DIR = {str(model_dir)!r}\n" + check)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh module cache: the .py files must come from the dir
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SNIPPET-OK" in res.stdout


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(TINY_CONFIG).eval()
    ids = torch.randint(10, 8000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return model, ids, mask


@pytest.mark.parametrize("search_type", SEARCH_TYPES)
def test_my_generate_every_search_type(tiny, search_type):
    model, ids, mask = tiny
    torch.manual_seed(1)
    out = model.my_generate(ids, mask, max_seq_len=8, search_type=search_type)
    assert out.shape[0] == 2 and 2 <= out.shape[1] <= 9
    assert (out[:, 0] == model.config.decoder_start_token_id).all()
    assert ((out >= 0) & (out < model.config.vocab_size)).all()


@pytest.fixture()
def talkative(tiny):
    """A fresh tiny model whose special tokens never win (as conftest's chatty model), and tiny's inputs."""
    _, ids, mask = tiny
    torch.manual_seed(0)
    model = build_model(TINY_CONFIG).eval()
    with torch.no_grad():
        model.shared.weight[:7].zero_()
    return model, ids, mask


def test_my_generate_is_greedy_by_default(talkative):
    model, ids, mask = talkative
    torch.manual_seed(1)  # the original's default, beam, samples: a seed makes it comparable
    greedy = model.my_generate(ids, mask, max_seq_len=8, search_type="greedy")
    assert torch.equal(model.my_generate(ids, mask, max_seq_len=8), greedy)
    assert (greedy[:, 1:] >= 7).all()


def test_eos_and_pad_come_from_the_model_config(talkative):
    """A model whose [EOS] / [PAD] ids are not 1 / 0: generation ends a row at the config's
    [EOS] and pads it with the config's [PAD] (they were hard-coded for all but contrastive)."""
    model, ids, mask = talkative
    first = model.my_generate(ids, mask, max_seq_len=6)[:, 1]
    eos, pad = int(first[0]), 3
    assert eos >= 7 and int(first[1]) != eos
    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    for search_type in ("greedy", "beam", "sampling"):
        gc = model.generation_config_for(search_type, 6)
        assert (gc.eos_token_id, gc.pad_token_id) == (eos, pad)
    out = model.my_generate(ids, mask, max_seq_len=6)
    assert out[0, 1] == eos and (out[0, 2:] == pad).all() and out.shape[1] == 7
    assert (out[1, 1:] != pad).all() and (out[1, 1:] != eos).all()


def test_unknown_search_type_is_rejected(tiny):
    model, ids, mask = tiny
    with pytest.raises(ValueError, match="search_type"):
        model.my_generate(ids, mask, max_seq_len=4, search_type="nucleus")


def test_degeneration_scores_by_hand():
    # Two candidates; context holds one vector e1 = (1, 0).
    # cand A = (1, 0): cos 1   -> 0.5 * 0.6 - 0.5 * 1.0 = -0.2
    # cand B = (0, 1): cos 0   -> 0.5 * 0.4 - 0.5 * 0.0 =  0.2   (B wins despite lower p)
    top_probs = torch.tensor([[0.6, 0.4]])
    cand = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    ctx = torch.tensor([[[3.0, 0.0]]])
    scores = degeneration_scores(top_probs, cand, ctx, penalty_alpha=0.5)
    assert torch.allclose(scores, torch.tensor([[-0.2, 0.2]]), atol=1e-6)
    # alpha 0 is plain model confidence
    assert torch.allclose(degeneration_scores(top_probs, cand, ctx, 0.0), top_probs)


def test_contrastive_with_alpha_zero_is_greedy(tiny):
    model, ids, mask = tiny
    greedy = model.my_generate(ids, mask, max_seq_len=7, search_type="greedy")
    contrastive = contrastive_search(model, ids, mask, max_new_tokens=7, penalty_alpha=0.0, top_k=5)
    n = min(greedy.shape[1], contrastive.shape[1])
    assert torch.equal(greedy[:, :n], contrastive[:, :n])


def _contrastive_without_cache(model, input_ids, attention_mask, max_new_tokens, penalty_alpha, top_k):
    """The project's earlier contrastive search: the decoder over the whole sequence for all
    K candidates at every step, no cache. The oracle the cached search must match."""
    from transformers.modeling_outputs import BaseModelOutput

    cfg = model.config
    batch = input_ids.size(0)
    enc = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    seq = torch.full((batch, 1), cfg.decoder_start_token_id, dtype=torch.long)
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=attention_mask,
                decoder_input_ids=seq, output_hidden_states=True, use_cache=False)
    logits, ctx = out.logits[:, -1], out.decoder_hidden_states[-1]
    enc_k, mask_k = enc.repeat_interleave(top_k, dim=0), attention_mask.repeat_interleave(top_k, dim=0)
    finished, rows = torch.zeros(batch, dtype=torch.bool), torch.arange(batch)
    for _ in range(max_new_tokens):
        probs, ids = logits.softmax(dim=-1).topk(top_k, dim=-1)
        cand = torch.cat([seq.repeat_interleave(top_k, dim=0), ids.reshape(-1, 1)], dim=1)
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc_k), attention_mask=mask_k,
                    decoder_input_ids=cand, output_hidden_states=True, use_cache=False)
        hidden = out.decoder_hidden_states[-1].view(batch, top_k, cand.size(1), -1)
        best = degeneration_scores(probs, hidden[:, :, -1], ctx, penalty_alpha).argmax(dim=-1)
        nxt = torch.where(finished, torch.full_like(ids[:, 0], cfg.pad_token_id), ids[rows, best])
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        ctx = hidden[rows, best]
        logits = out.logits.view(batch, top_k, cand.size(1), -1)[rows, best, -1]
        finished |= nxt == cfg.eos_token_id
        if bool(finished.all()):
            break
    return seq


@pytest.mark.parametrize("alpha, k", [(0.5, 50), (0.9, 8)])
def test_contrastive_with_cache_gives_the_tokens_of_the_uncached_search(tiny_model_dir, alpha, k):
    """The KV-cached search picks the same tokens as the whole-sequence search on fixed prompts
    (a padded batch of two, the original's settings and a strong penalty)."""
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir).eval()
    enc = tok(["今天天气很好，我们去", "你好"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = _contrastive_without_cache(model, enc["input_ids"], enc["attention_mask"], 24, alpha, k)
    got = contrastive_search(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24,
                             penalty_alpha=alpha, top_k=k)
    assert got.shape[1] > 10
    assert torch.equal(got, expected)


def test_contrastive_penalty_changes_choice_when_context_repeats(tiny):
    """With a strong penalty the search must avoid re-emitting tokens whose hidden state
    repeats the context; the result differs from greedy on a random model that loops."""
    model, ids, mask = tiny
    greedy = model.my_generate(ids, mask, max_seq_len=10, search_type="greedy")
    strong = contrastive_search(model, ids, mask, max_new_tokens=10, penalty_alpha=0.9, top_k=8)
    assert not torch.equal(greedy[:, : strong.shape[1]], strong[:, : greedy.shape[1]])


def test_streamer_gets_the_same_text(tiny_model_dir):
    from transformers import TextIteratorStreamer
    import threading

    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir).eval()
    enc = tok(["今天天气很好"], return_tensors="pt")
    for search_type in ("greedy", "contrastive"):
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=model.my_generate(
            enc["input_ids"], enc["attention_mask"], max_seq_len=6, search_type=search_type, streamer=streamer)))
        thread.start()
        streamed = "".join(streamer)
        thread.join()
        assert streamed == tok.decode(result["out"][0], skip_special_tokens=True)


def test_load_legacy_bin_and_safetensors_file(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir).eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}  # the original wrapper's prefix
    torch.save(state, tmp_path / "chat_small_t5.best.bin")
    legacy = load_model(tmp_path / "chat_small_t5.best.bin", config_file=tiny_model_dir / "config.json").eval()
    from_file = load_model(tiny_model_dir / "model.safetensors").eval()
    ids = torch.tensor([[5, 6, 7, 1]])
    ref = model(input_ids=ids, decoder_input_ids=ids).logits
    for other in (legacy, from_file):
        assert torch.equal(other(input_ids=ids, decoder_input_ids=ids).logits, ref)


def test_legacy_bin_with_pickled_objects_is_refused(tmp_path, tiny_model_dir):
    import argparse

    torch.save({"shared.weight": argparse.Namespace(x=1)}, tmp_path / "evil.bin")
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_model(tmp_path / "evil.bin", config_file=tiny_model_dir / "config.json")


def test_loading_is_strict(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.block.1")}
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(UserError, match="missing.*decoder.block.1"):
        load_model(tmp_path / "partial.bin", config_file=tiny_model_dir / "config.json")
    with pytest.raises(UserError, match="model not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "empty_dir")


def test_save_is_atomic(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    out = tmp_path / "out"
    save_model(model, out, load_tokenizer(tiny_model_dir))
    before = (out / "model.safetensors").read_bytes()

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with torch.no_grad():
        model.shared.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out, BrokenTokenizer())
    assert (out / "model.safetensors").read_bytes() == before  # the previous copy is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_sdpa_is_the_default_and_matches_eager(tokenizer_dir):
    """transformers 5.25 runs our T5 through PyTorch SDPA by default; eager gives the same
    logits and gradients (relative position bias and padding mask included)."""
    torch.manual_seed(0)
    sdpa = build_model(TINY_CONFIG)
    assert sdpa.config._attn_implementation == "sdpa"
    eager = build_model(TINY_CONFIG)
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    tokenizer = load_tokenizer(tokenizer_dir)
    assert eager.config._attn_implementation == "eager"
    assert eager.encoder.block[0].layer[0].SelfAttention.config._attn_implementation == "eager"
    enc = tokenizer(["今天天气很好，我们去公园散步吧", "你好"], padding=True, return_tensors="pt")
    labels = tokenizer(["好的，一起去", "你好，有什么可以帮你"], padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    results = []
    for model in (sdpa, eager):
        model.train()  # the tiny config has no dropout: train mode is deterministic
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-4)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6, rtol=1e-3), name


def test_save_and_load_draw_no_progress_bars(tiny_model_dir, tmp_path, capfd):
    """transformers 5 drew 'Loading weights' and 'Writing model shards' bars into every log."""
    from model.chat_model import load_model, load_tokenizer, save_model

    capfd.readouterr()
    save_model(load_model(tiny_model_dir), tmp_path / "copy", load_tokenizer(tiny_model_dir))
    out, err = capfd.readouterr()
    assert "Loading weights" not in err + out and "Writing model shards" not in err + out


def test_the_trainer_finds_the_tokenizers_special_ids_already_in_the_config(tiny_model_dir, monkeypatch):
    """Without fill_special_token_ids the HF Trainer warned at every SFT run that it had put
    the tokenizer's [BOS] id into the model's configs."""
    from transformers import trainer_utils

    from model.chat_model import fill_special_token_ids, load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    warned = []
    monkeypatch.setattr(trainer_utils.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    fill_special_token_ids(model, tokenizer)
    trainer_utils.align_special_tokens(model, tokenizer)
    assert warned == []
    assert model.config.bos_token_id == model.generation_config.bos_token_id == tokenizer.bos_token_id
    model.config.bos_token_id = model.generation_config.bos_token_id = None  # as saved by train.py
    trainer_utils.align_special_tokens(model, tokenizer)
    assert warned and "bos_token_id" in warned[0]  # the check can fail
