"""The data pipeline: sources and their errors, loss masks against the tokenizer's own rendering, packing,
grain shuffling, process shards and resumable iterator state."""

import json
from collections import Counter

import datasets
import ml_collections
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxft.data import DataError, for_training, make_dataset, make_eval_batches, read_records, tokenize_records

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls count stars at night".split()


def _tokenizer(chat_template=CHATML, bos=False):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 5 + ["### Instruction:\n### Response:\n"], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 4)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", bos_token="<s>" if bos else None,
        chat_template=chat_template)


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def _alpaca(n, seed=0, max_words=12):
    rng = np.random.default_rng(seed)
    return [{"instruction": _sentence(rng, rng.integers(1, max_words)),
             "input": _sentence(rng, rng.integers(1, 4)) if i % 3 == 0 else "",
             "output": _sentence(rng, rng.integers(1, max_words))} for i in range(n)]


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _examples(batch):
    """Per example (row, segment): its (token, target, mask) triples, as a hashable tuple."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        for s in np.unique(batch["segment_ids"][r]):
            if s == 0:
                continue
            at = batch["segment_ids"][r] == s
            out.append(tuple(zip(batch["tokens"][r, at], batch["targets"][r, at], batch["loss_mask"][r, at])))
    return out


def _runs(tokens, mask):
    """The maximal runs of tokens where mask is 1."""
    runs, current = [], []
    for t, m in zip(tokens, mask):
        if m:
            current.append(int(t))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _one(tmp_path, records, fmt, tokenizer, seq_len=512, **kw):
    """A single unpacked eval batch, one example per row, in file order."""
    path = _jsonl(tmp_path / "d.jsonl", records)
    batches, stats = make_eval_batches(path, fmt, tokenizer, seq_len, len(records), pack=False,
                                       cache_dir=tmp_path / "hf", process_index=0, process_count=1, **kw)
    assert len(batches) == 1
    return batches[0], stats


# --- loss masks -------------------------------------------------------------------------------------------

def test_alpaca_loss_mask_is_exactly_the_response_of_the_chat_template(tmp_path, tok):
    records = [{"instruction": "count the stars", "input": "at night", "output": "seven wise owls"},
               {"instruction": "jumps over", "output": "the lazy dog"}]
    batch, stats = _one(tmp_path, records, "alpaca", tok)
    assert stats.examples == 2 and stats.skipped_too_long == 0
    for r, rec in enumerate(records):
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        expected = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"]) + [tok.eos_token_id]
        n = len(expected) - 1
        seg = batch["segment_ids"][r]
        assert (seg[:n] == 1).all() and (seg[n:] == 0).all()
        np.testing.assert_array_equal(batch["tokens"][r, :n], expected[:-1])
        np.testing.assert_array_equal(batch["targets"][r, :n], expected[1:])
        runs = _runs(batch["targets"][r], batch["loss_mask"][r])
        assert [tok.decode(x) for x in runs] == [rec["output"] + "<|im_end|>\n<|endoftext|>"]
    assert stats.target_tokens == int(batch["loss_mask"].sum())


def test_multi_turn_messages_mask_every_non_assistant_token(tmp_path, tok):
    conversation = [{"role": "system", "content": "a wise owl"}, {"role": "user", "content": "the fox"},
                    {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": "the dog"},
                    {"role": "assistant", "content": "is lazy"}]
    batch, _ = _one(tmp_path, [{"messages": conversation}], "messages", tok)
    expected = list(tok.apply_chat_template(conversation, tokenize=True)["input_ids"]) + [tok.eos_token_id]
    n = len(expected) - 1
    np.testing.assert_array_equal(batch["targets"][0, :n], expected[1:])
    runs = _runs(batch["targets"][0], batch["loss_mask"][0])
    assert [tok.decode(x) for x in runs] == ["jumps over<|im_end|>\n", "is lazy<|im_end|>\n<|endoftext|>"]


def test_system_prompt_is_added_to_conversations_without_one(tmp_path, tok):
    records = [{"instruction": "the fox", "output": "jumps"}]
    batch, _ = _one(tmp_path, records, "alpaca", tok, system_prompt="a wise owl")
    messages = [{"role": "system", "content": "a wise owl"}, {"role": "user", "content": "the fox"},
                {"role": "assistant", "content": "jumps"}]
    expected = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"]) + [tok.eos_token_id]
    np.testing.assert_array_equal(batch["targets"][0, :len(expected) - 1], expected[1:])


def test_field_mapping_and_sharegpt_roles(tmp_path, tok):
    conv = [{"from": "human", "value": "the fox"}, {"from": "gpt", "value": "jumps over"}]
    batch, _ = _one(tmp_path, [{"conversations": conv}], "messages", tok,
                    fields={"messages": "conversations", "role": "from", "content": "value"})
    runs = _runs(batch["targets"][0], batch["loss_mask"][0])
    assert [tok.decode(x) for x in runs] == ["jumps over<|im_end|>\n<|endoftext|>"]
    with pytest.raises(ValueError, match="unknown field"):
        _one(tmp_path, [{"conversations": conv}], "messages", tok, fields={"conversation": "x"})


def test_plain_template_without_chat_template_and_bos(tmp_path):
    tok = _tokenizer(chat_template=None, bos=True)
    records = [{"instruction": "the fox", "input": "", "output": "jumps over"}]
    batch, _ = _one(tmp_path, records, "alpaca", tok)
    n = int((batch["segment_ids"][0] > 0).sum())
    assert batch["tokens"][0, 0] == tok.bos_token_id and (batch["tokens"][0, 1:n] != tok.bos_token_id).all()
    text = tok.decode(list(batch["tokens"][0, :n]) + [batch["targets"][0, n - 1]])
    assert text == "<s>### Instruction:\nthe fox\n\n### Response:\njumps over<|endoftext|>"
    runs = _runs(batch["targets"][0], batch["loss_mask"][0])
    assert [tok.decode(x) for x in runs] == ["jumps over<|endoftext|>"]


def test_text_documents_are_chunked_and_every_token_is_a_target_once(tmp_path, tok):
    doc = _sentence(np.random.default_rng(1), 200)
    path = tmp_path / "doc.txt"
    path.write_text(doc)
    batches, stats = make_eval_batches(path, "text", tok, 16, 4, cache_dir=tmp_path / "hf", process_index=0,
                                       process_count=1)
    expected = tok(doc)["input_ids"] + [tok.eos_token_id]
    assert stats.examples == -(-(len(expected) - 1) // 16) and stats.target_tokens == len(expected) - 1
    chunks = sorted((e for b in batches for e in _examples(b)), key=len, reverse=True)  # all full but the last
    targets = [t for b in batches for r in range(4) for t in b["targets"][r][b["loss_mask"][r] > 0]]
    assert sorted(targets) == sorted(expected[1:])
    assert all(len(c) == 16 for c in chunks[:-1]) and all(m == 1 for c in chunks for _, _, m in c)


def test_too_long_prompts_are_skipped_and_counted_long_responses_truncated(tmp_path, tok, caplog):
    long = " ".join(["the quick brown fox"] * 30)
    records = [{"instruction": "the fox", "output": "jumps over"},
               {"instruction": long, "output": "jumps over"},
               {"instruction": "the dog", "output": long}]
    with caplog.at_level("WARNING"):
        batch, stats = _one(tmp_path, records, "alpaca", tok, seq_len=40)
    assert stats.records == 3 and stats.examples == 2 and stats.skipped_too_long == 1
    assert "d.jsonl:2" in caplog.text
    assert batch["targets"].shape == (3, 40) and (batch["segment_ids"][2] == 0).all()  # an empty row fills the batch
    assert batch["loss_mask"][1, -1] == 1 and (batch["segment_ids"][1] == 1).all()  # cut, not dropped
    assert tok.decode(_runs(batch["targets"][0], batch["loss_mask"][0])[0]).startswith("jumps over")
    with pytest.raises(DataError, match="no example left.*1 with a prompt longer than seq_len=40"):
        _one(tmp_path, records[1:2], "alpaca", tok, seq_len=40)


# --- packing and batches -----------------------------------------------------------------------------------

def test_packing_keeps_examples_apart_and_matches_unpacked(tmp_path, tok):
    path = _jsonl(tmp_path / "a.jsonl", _alpaca(40))
    kw = dict(cache_dir=tmp_path / "hf", process_index=0, process_count=1)
    packed, ps = make_eval_batches(path, "alpaca", tok, 128, 4, pack=True, **kw)
    unpacked, us = make_eval_batches(path, "alpaca", tok, 128, 4, pack=False, **kw)
    assert ps.rows < us.rows == 40 and ps.fill > us.fill and ps.target_tokens == us.target_tokens
    for b in packed:
        assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
            "tokens": (np.int32, (4, 128)), "targets": (np.int32, (4, 128)), "loss_mask": (np.float32, (4, 128)),
            "segment_ids": (np.int32, (4, 128)), "positions": (np.int32, (4, 128))}
        seg, pos = b["segment_ids"], b["positions"]
        for r in range(4):
            ids = seg[r][seg[r] > 0]
            assert (np.diff(ids) >= 0).all() and (seg[r][len(ids):] == 0).all()  # contiguous, padding last
            for s in np.unique(ids):
                np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
        same = seg[:, 1:] == seg[:, :-1]
        # Inside an example the next input is this target; at a boundary the target is the example's EOS.
        np.testing.assert_array_equal(b["tokens"][:, 1:][same], b["targets"][:, :-1][same])
        last = (seg[:, :-1] > 0) & ~same
        assert (b["targets"][:, :-1][last] == tok.eos_token_id).all()
        assert (b["loss_mask"][seg == 0] == 0).all()
    assert Counter(e for b in packed for e in _examples(b)) == Counter(e for b in unpacked for e in _examples(b))


def test_shuffle_is_seeded_epochs_cover_every_row(tmp_path, tok):
    path = _jsonl(tmp_path / "a.jsonl", _alpaca(24))
    kw = dict(pack=False, cache_dir=tmp_path / "hf", process_index=0, process_count=1)

    def first_tokens(seed, epochs=2):
        ds, stats = make_dataset(path, "alpaca", tok, 96, 4, seed, num_epochs=epochs, **kw)
        assert stats.batches_per_epoch == 6
        return [tuple(b["targets"][r]) for b in ds for r in range(4)]

    a, b, c = first_tokens(0), first_tokens(0), first_tokens(1)
    assert a == b and a != c and len(a) == 48
    assert Counter(a[:24]) == Counter(a[24:]) == Counter(c[:24]) and len(set(a[:24])) == 24
    assert a[:24] != a[24:]  # each epoch reshuffled


def test_process_shards_are_disjoint_and_together_the_global_batch(tmp_path, tok):
    path = _jsonl(tmp_path / "a.jsonl", _alpaca(32))
    kw = dict(pack=False, num_epochs=1, cache_dir=tmp_path / "hf")
    whole, _ = make_dataset(path, "alpaca", tok, 96, 8, 3, process_index=0, process_count=1, **kw)
    shards = [make_dataset(path, "alpaca", tok, 96, 8, 3, process_index=p, process_count=2, **kw)[0]
              for p in range(2)]
    seen = []
    for g, p0, p1 in zip(whole, *shards, strict=True):
        assert p0["tokens"].shape == (4, 96)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])
        seen += [tuple(e) for e in _examples(p0)] + [tuple(e) for e in _examples(p1)]
    assert len(seen) == len(set(seen)) == 32
    with pytest.raises(ValueError, match="not divisible"):
        make_dataset(path, "alpaca", tok, 96, 8, process_index=0, process_count=3, **kw)


def test_iterator_state_resumes_with_the_next_batch(tmp_path, tok):
    path = _jsonl(tmp_path / "a.jsonl", _alpaca(30))
    ds, stats = make_dataset(path, "alpaca", tok, 64, 4, 7, cache_dir=tmp_path / "hf", process_index=0,
                             process_count=1)
    it = iter(ds)
    for _ in range(stats.batches_per_epoch + 2):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = iter(make_dataset(path, "alpaca", tok, 64, 4, 7, cache_dir=tmp_path / "hf", process_index=0,
                                process_count=1)[0])
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_eval_batches_one_deterministic_pass_padded(tmp_path, tok):
    path = _jsonl(tmp_path / "a.jsonl", _alpaca(10))
    kw = dict(pack=False, cache_dir=tmp_path / "hf")
    a, stats = make_eval_batches(path, "alpaca", tok, 96, 4, process_index=0, process_count=1, **kw)
    b, _ = make_eval_batches(path, "alpaca", tok, 96, 4, process_index=0, process_count=1, **kw)
    assert len(a) == stats.batches_per_epoch == 3 and stats.rows == 10
    assert all((x[k] == y[k]).all() for x, y in zip(a, b) for k in x)
    assert (a[2]["segment_ids"][2:] == 0).all() and (a[2]["loss_mask"][2:] == 0).all()
    shard, _ = make_eval_batches(path, "alpaca", tok, 96, 4, process_index=1, process_count=2, **kw)
    np.testing.assert_array_equal(shard[0]["tokens"], a[0]["tokens"][2:])


def test_for_training_reads_the_config_and_holds_out_eval_examples(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # keep ~/.cache clean
    c = ml_collections.ConfigDict()
    c.seed = 5
    c.data = dict(train=str(_jsonl(tmp_path / "a.jsonl", _alpaca(40))), eval="", eval_fraction=0.25,
                  format="alpaca", instruction_field="instruction", input_field="input", output_field="output",
                  messages_field="messages", text_field="text", system_prompt="", pack=False)
    c.train = dict(seq_len=96, batch_size=5, eval_batches=1)
    it, evals, stats = for_training(c, tok)
    assert stats["train"]["examples"] == 30 and stats["eval"]["examples"] == 10 and len(evals) == 1
    seen = {e for _ in range(stats["train"]["batches_per_epoch"]) for e in _examples(next(it))}
    held_out = {e for b in evals for e in _examples(b)}
    assert len(seen) == 30 and len(held_out) == 5 and not seen & held_out
    state = it.get_state()
    want = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["targets"], want["targets"])


# --- sources and their errors ---------------------------------------------------------------------------------

def test_every_file_type_gives_the_same_records(tmp_path):
    records = [{"instruction": "NA", "input": "", "output": "42"},
               {"instruction": "two\nlines, quoted", "input": "x", "output": "y"}]
    _jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    ds = datasets.Dataset.from_list(records)
    ds.to_csv(tmp_path / "a.csv", index=False)
    ds.to_csv(tmp_path / "a.tsv", index=False, sep="\t")
    ds.to_parquet(tmp_path / "a.parquet")
    ds.save_to_disk(tmp_path / "saved")
    for name in ["a.jsonl", "a.json", "a.csv", "a.tsv", "a.parquet", "saved"]:
        got = read_records(tmp_path / name, cache_dir=tmp_path / "hf")
        assert [r.fields for r in got] == records, name
    assert [r.where for r in read_records(tmp_path / "a.json", cache_dir=tmp_path / "hf")][1].endswith("a.json:7")
    assert [r.where for r in read_records(tmp_path / "a.csv", cache_dir=tmp_path / "hf")][1].endswith("a.csv:3")

    (tmp_path / "t.txt").write_text("one line\n\nthird line\n")
    doc = read_records(tmp_path / "t.txt", cache_dir=tmp_path / "hf")
    lines = read_records(tmp_path / "t.txt", text_sample_by="line", cache_dir=tmp_path / "hf")
    assert [r.fields["text"] for r in doc] == ["one line\n\nthird line\n"]
    assert [(r.fields["text"], r.where[-7:]) for r in lines] == [("one line", "t.txt:1"), ("third line", "t.txt:3")]


BAD = [
    ("bad.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n', r"bad\.jsonl:3: malformed JSON"),
    ("bad.jsonl", b'{"text": "a"}\n["b"]\n', r"bad\.jsonl:2: expected a JSON object"),
    ("bad.json", b'[\n  {"text": "a"},\n  {"text": "b"\n  }\n  {"text": "c"}\n]', r"bad\.json:5: malformed JSON"),
    ("bad.json", b'[{"text": "a"},\n {"text": "b\\x"}]', r"bad\.json:2: malformed JSON"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: invalid UTF-8"),
    ("bad.txt", b"fine\nalso fine\nnot \xff fine\n", r"bad\.txt:3: invalid UTF-8"),
    ("bad.csv", b'text\n"multi\nline"\n\x80\n', r"bad\.csv:4: invalid UTF-8"),
    ("empty.jsonl", b"\n\n", r"empty\.jsonl: the data set is empty"),
    ("empty.json", b"[]", r"empty\.json: the data set is empty"),
    ("empty.txt", b"  \n", r"empty\.txt: the data set is empty"),
    ("empty.csv", b"", r"empty\.csv: the data set is empty"),
    ("data.xml", b"<a/>", r"data\.xml: unknown file type"),
]


@pytest.mark.parametrize("name,content,error", BAD, ids=[f"{n}:{e.split(': ')[-1]}" for n, _, e in BAD])
def test_bad_files_name_file_and_line(tmp_path, name, content, error):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=error) as info:
        read_records(tmp_path / name, cache_dir=tmp_path / "hf")
    assert "\n" not in str(info.value)


BAD_RECORDS = [
    ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}],
     r"d\.jsonl:2: missing field 'output' \(the record has: instruction, answer"),
    ("alpaca", [{"instruction": "a", "output": 3}], r"d\.jsonl:1: field 'output' must be a string, got int"),
    ("messages", [{"messages": [{"role": "user", "content": "a"}]}], r"d\.jsonl:1: .*no assistant message"),
    ("messages", [{"messages": [{"role": "bot", "content": "a"}]}], r"d\.jsonl:1: messages\[0\] has role 'bot'"),
    ("messages", [{"messages": "hello"}], r"d\.jsonl:1: field 'messages' must be a non-empty list"),
    ("text", [{"text": "a"}, {"body": "b"}], r"d\.jsonl:2: missing field 'text'"),
]


@pytest.mark.parametrize("fmt,records,error", BAD_RECORDS)
def test_bad_records_name_line_and_field(tmp_path, tok, fmt, records, error):
    with pytest.raises(DataError, match=error):
        _one(tmp_path, records, fmt, tok)


def test_a_data_set_in_the_hugging_face_cache_is_read_by_name_offline(tmp_path):
    # Lay the cache out as a Hub download leaves it: <cache>/<org>___<name>/<config>/<version>/<hash>/.
    cache = tmp_path / "hf"
    records = [{"text": "a"}, {"text": "b"}]
    datasets.load_dataset("json", data_files=str(_jsonl(tmp_path / "a.jsonl", records)), split="train",
                          cache_dir=cache)
    built = next(p for p in (cache / "json").glob("*/*/*") if p.is_dir())
    target = cache / "jaxft-test___tiny" / "default" / "0.0.0" / "0"
    target.parent.mkdir(parents=True)
    built.rename(target)
    (target / "json-train.arrow").rename(target / "tiny-train.arrow")
    got = read_records("jaxft-test/tiny", cache_dir=cache)
    assert [(r.fields, r.where) for r in got] == [(records[0], "jaxft-test/tiny row 0"),
                                                  (records[1], "jaxft-test/tiny row 1")]


def test_missing_sources(tmp_path, tok):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="jaxft-test/not-cached: no such file, nor a data set in the local"):
        read_records("jaxft-test/not-cached", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(DataError, match="fewer than the batch size 8"):
        make_dataset(_jsonl(tmp_path / "a.jsonl", _alpaca(3)), "alpaca", tok, 64, 8, cache_dir=tmp_path / "hf",
                     process_index=0, process_count=1)


def test_template_that_is_not_prefix_stable_is_an_error(tmp_path):
    # Renders the turns in reverse: a prompt rendering is not a prefix of the whole conversation.
    reverse = ("{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tok = _tokenizer(chat_template=reverse)
    records = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataError, match="d.jsonl:1: the chat template does not render message 1"):
        tokenize_records(read_records(_jsonl(tmp_path / "d.jsonl", records), cache_dir=tmp_path / "hf"),
                         "messages", tok, 64)


def test_json_strings_that_look_like_dates_stay_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "x", "input": "2031-07-04", "output": "July 4, 2031"}\n'
                    '{"instruction": "y", "output": "z", "extra": 3}\n')
    records = read_records(path)
    assert records[0].fields["input"] == "2031-07-04" and records[1].fields["input"] is None
    assert records[1].fields["extra"] == 3
