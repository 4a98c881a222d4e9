"""Sequence-to-sequence task: the loss mask of prompt + target rows token by token, packing, the loss against
transformers' `labels=` loss (tiny Llama and tiny T5), generation-based evaluation against `jaxft.generate` /
`jaxft.generate.generate` (T5) and `jaxft.metrics`, parallel files, and the errors of bad input."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny
from jaxft import checkpoint, metrics
from jaxft import config as config_lib
from jaxft import generate as gen
from jaxft.data import DataError, Record, packing, read_records, tokenize_records
from jaxft.data.sources import read_parallel
from jaxft.models import llama
from jaxft.tasks import Eval, Model, seq2seq
from jaxft.data import rows as task_rows

ROOT = Path(__file__).resolve().parents[1]
W = tiny.WORDS
FIELDS = {"source": "src", "target": "tgt"}


def pairs(n: int) -> list[dict]:
    return [{"src": " ".join(W[(i + j) % len(W)] for j in range(4 + i % 5)),
             "tgt": " ".join(W[(3 * i + j) % len(W)] for j in range(2 + i % 4))} for i in range(n)]


def records(rows: list[dict]) -> list[Record]:
    return [Record(r, f"mem:{i + 1}") for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.llama_dir(tmp_path_factory.mktemp("s2s_llama"))


@pytest.fixture(scope="module")
def loaded(llama_dir):
    return checkpoint.load(llama_dir)


def make_config(tmp_path, model, train, **overrides):
    items = {"model": str(model), "data.train": str(train), "data.source_field": "src", "data.target_field": "tgt",
             "train.seq_len": 64, "train.batch_size": 2, "train.eval_batches": 100, "data.eval_fraction": 0.3,
             "data.prompt_template": "write this: {source}", "eval.generate_max_new_tokens": 6,
             "eval.batch_size": 3, "eval.metrics": "rouge,bleu", **overrides}
    return config_lib.load(ROOT / "configs" / "samsum_lora.py", [f"{k}={v}" for k, v in items.items()])


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- decoder-only rows --------------------------------------------------------------------------------------

def test_chat_loss_mask_is_exactly_the_answer(tok):
    """Under the chat template the row is the rendered conversation + EOS, and the counted tokens are the
    target's, the end of the assistant turn and EOS: everything after the generation prompt, nothing before."""
    rec = records([{"src": "the quick brown fox", "tgt": "jumps over a lazy dog"}])
    ex = tokenize_records(rec, "seq2seq", tok, 64, fields=FIELDS, prompt_template="write this: {source}")
    ids, loss = ex.ids.tolist(), ex.loss
    user = [{"role": "user", "content": "write this: the quick brown fox"}]
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "jumps over a lazy dog"}], tokenize=False)
    start = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    prompt = tok(start, add_special_tokens=False)["input_ids"]
    assert ids == full_ids + [tok.eos_token_id]
    assert ids[:len(prompt)] == prompt
    assert loss.tolist() == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    assert tok.decode([i for i, m in zip(ids, loss) if m]) == "jumps over a lazy dog<|im_end|>\n<|endoftext|>"
    # What generation starts from is exactly the uncounted head of the row.
    from jaxft.data.formats import prompt_ids
    assert prompt_ids("write this: the quick brown fox", tok) == prompt


def test_plain_loss_mask_is_exactly_the_target(tok):
    """Without a chat template: the prompt text, then the target, then EOS; the target and EOS count."""
    rec = records([{"src": "seven wise owls", "tgt": "count stars at night"}])
    ex = tokenize_records(rec, "seq2seq", tok, 64, fields=FIELDS, chat_template=False,
                          prompt_template="write this date in words: {source}\n")
    prompt = tok("write this date in words: seven wise owls\n", add_special_tokens=False)["input_ids"]
    target = tok("count stars at night", add_special_tokens=False)["input_ids"]
    assert ex.ids.tolist() == prompt + target + [tok.eos_token_id]
    assert ex.loss.tolist() == [False] * len(prompt) + [True] * (len(target) + 1)


def test_packed_loss_equals_unpacked_and_transformers(loaded, llama_dir, tok):
    """The seq2seq loss of packed rows equals that of one example per row; one row's loss equals transformers'
    labels= loss with the prompt positions set to -100."""
    ex = tokenize_records(records(pairs(9)), "seq2seq", tok, 128, fields=FIELDS, prompt_template="{source}")
    model = Model(family=llama, cfg=loaded.cfg)

    @jax.jit
    def loss(batch):
        return seq2seq.loss(seq2seq.forward(model, loaded.params, None, batch), batch)

    packed_rows = packing.pack(ex.lengths(), 128)
    assert len(packed_rows) < len(ex)  # several examples share a row
    packed = loss(packing.build_rows(ex, packed_rows, 128))
    single = loss(packing.build_rows(ex, packing.one_per_row(len(ex)), 128))
    assert float(packed[1]) == float(single[1]) == ex.target_tokens()
    np.testing.assert_allclose(float(packed[0]) / float(packed[1]), float(single[0]) / float(single[1]),
                               rtol=1e-5, atol=1e-5)

    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = ex.ids[ex.starts[2]:ex.starts[3]]
    labels = np.where(ex.loss[ex.starts[2]:ex.starts[3]], ids, -100)
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None]).long(), labels=torch.tensor(labels[None]).long()).loss.item()
    ours = loss(packing.build_rows(ex, [np.array([2])], 128))
    np.testing.assert_allclose(float(ours[0]) / float(ours[1]), ref, rtol=1e-5, atol=1e-5)


# ---- generation-based evaluation ----------------------------------------------------------------------------

def make_eval(config, loaded, batches, trainable=None):
    model = Model(family=llama, cfg=loaded.cfg)

    @jax.jit
    def step(batch):
        out = seq2seq.forward(model, loaded.params, trainable, batch)
        return (*seq2seq.loss(out, batch), seq2seq.predict(out, batch))

    return Eval(batches=batches, step=step, info={}, config=config, model=model, base=loaded.params,
                trainable=trainable, tokenizer=loaded.tokenizer)


def test_evaluate_generates_and_scores(tmp_path, loaded):
    """evaluate = the mean loss of the eval batches, its perplexity, and ROUGE / BLEU / chrF (jaxft.metrics) of
    the texts that jaxft.generate.generate produces from the chat prompts of the held-out records."""
    rows = pairs(20)
    # Larger output weights spread the random model's logits, so that it writes words, not only EOS.
    params = dict(loaded.params, lm_head={"w": loaded.params["lm_head"]["w"] * 20})
    loaded = checkpoint.Loaded(loaded.cfg, params, loaded.tokenizer, loaded.path, loaded.source)
    config = make_config(tmp_path, loaded.path, jsonl(tmp_path / "d.jsonl", rows), **{"eval.batch_size": 6})
    train_iter, eval_list, info = seq2seq.batches(config, loaded.tokenizer)
    assert info["kind"] == "decoder" and info["eval"]["records"] == 6 and info["train"]["records"] == 14
    first = next(train_iter)
    assert set(first) == set(packing.BATCH_KEYS) and first["tokens"].shape == (2, 64)
    state = train_iter.get_state()
    again = next(train_iter)
    train_iter.set_state(state)
    assert all(np.array_equal(again[k], v) for k, v in next(train_iter).items())

    ev = make_eval(config, loaded, eval_list)
    results = seq2seq.evaluate(ev)

    tok = loaded.tokenizer
    train, held = seq2seq.split(config)
    kept, out = task_rows.held_out(20, 0.3, config.seed)
    assert [r.fields for r in train] == [rows[i] for i in kept] and [r.fields for r in held] == [rows[i] for i in out]
    prompts = [tok.apply_chat_template([{"role": "user", "content": "write this: " + r.fields["src"]}],
                                       tokenize=False, add_generation_prompt=True) for r in held]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert seq2seq.stop_ids(tok, True) == stop
    new = gen.generate(loaded.cfg, params, ids, max_new_tokens=6, eos_ids=stop)
    preds = [tok.decode(n, skip_special_tokens=True).strip() for n in new]
    assert sum(map(len, new)) > 10  # the tiny model says something
    assert seq2seq.generate_texts(ev.model, params, None, tok, config, seq2seq.texts(held, config)[0]) == preds
    refs = [r.fields["tgt"] for r in held]

    total = count = 0.0
    for b in eval_list:
        s, n, _ = ev.step(b)
        total, count = total + float(s), count + float(n)
    expected = {"loss": total / count, "perplexity": metrics.perplexity(total / count),
                **metrics.rouge(preds, refs), **metrics.bleu_chrf(preds, refs)}
    assert results.keys() == expected.keys()
    for k, v in expected.items():
        assert type(results[k]) is float
        np.testing.assert_allclose(results[k], v, rtol=1e-6, err_msg=k)
    json.dumps(results)

    # eval.max_examples: the first held-out records only.
    only_rouge = make_config(tmp_path, loaded.path, tmp_path / "d.jsonl", **{"eval.metrics": "rouge",
                                                                            "eval.max_examples": 2})
    out = seq2seq.evaluate(make_eval(only_rouge, loaded, eval_list))
    assert "bleu" not in out and "rouge1_f1" in out
    np.testing.assert_allclose(out["rougeL_f1"], metrics.rouge(preds[:2], refs[:2])["rougeL_f1"], rtol=1e-6)

    # Sampling: the same seed draws the same texts, which are not the greedy ones.
    sampled = make_config(tmp_path, loaded.path, tmp_path / "d.jsonl", **{"eval.temperature": 1.0, "eval.top_k": 20})
    draw = lambda: seq2seq.generate_texts(ev.model, params, None, tok, sampled, seq2seq.texts(held[:2], config)[0])
    assert draw() == draw() != preds[:2]


def test_unknown_metric_or_bad_template_fail_before_training(tmp_path, tok):
    bad = make_config(tmp_path, "default", jsonl(tmp_path / "d.jsonl", pairs(10)), **{"eval.metrics": "rouge,meteor"})
    with pytest.raises(ValueError, match="eval.metrics: meteor not among rouge, bleu"):
        seq2seq.batches(bad, tok)
    with pytest.raises(config_lib.ConfigFileError, match=r"^eval.metrics: 'rouge,meteor' meteor not among rouge"):
        config_lib.validate(bad)
    # every key is declared in the base config: a causal-LM config runs seq2seq with its defaults, and what a
    # task cannot use is refused by validate
    sft = config_lib.load(ROOT / "configs" / "default_lora.py", ["task=seq2seq", f"data.train={tmp_path / 'd.jsonl'}",
                                                                 "data.prompt_template=Summarize:"])
    with pytest.raises(config_lib.ConfigFileError, match=r"^data.prompt_template: 'Summarize:' must contain "):
        config_lib.validate(sft)


def test_train_end_to_end(tmp_path, llama_dir):
    """A short `jaxft train` run on a tiny Llama: the loss falls, and every evaluation logs the loss, its
    perplexity and the generation metrics."""
    from jaxft.train.loop import train

    config = make_config(tmp_path, llama_dir, jsonl(tmp_path / "d.jsonl", pairs(24)), **{
        "data.prompt_template": "{source}", "train.seq_len": 128, "train.steps": 4, "train.eval_every": 0,
        "train.learning_rate": 0.01, "train.warmup_steps": 0, "eval.max_examples": 3, "dtype": "float32",
        "param_dtype": "float32", "eval.metrics": "bleu"})
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "completed" and [s for s, _ in summary["eval_history"]] == [0, 4]
    assert summary["eval_history"][1][1] < summary["eval_history"][0][1]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in logged if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 4]
    for m in evals:
        assert {"eval_perplexity", "eval_bleu", "eval_chrf"} <= set(m)
        np.testing.assert_allclose(m["eval_perplexity"], np.exp(m["eval_loss"]), rtol=1e-6)


# ---- files and bad input ------------------------------------------------------------------------------------

def test_parallel_files_crlf_and_counts(tmp_path):
    (tmp_path / "a.en").write_bytes(b"two dogs run\r\na man sits\r\n\r\nthe end\r\n")
    (tmp_path / "a.de").write_bytes(b"zwei Hunde laufen\r\nein Mann sitzt\r\n\r\ndas Ende")
    recs = read_parallel(tmp_path / "a.en", tmp_path / "a.de", keys=("en", "de"))
    assert [r.fields for r in recs] == [{"en": "two dogs run", "de": "zwei Hunde laufen"},
                                        {"en": "a man sits", "de": "ein Mann sitzt"}, {"en": "", "de": ""},
                                        {"en": "the end", "de": "das Ende"}]
    assert recs[3].where == f"{tmp_path / 'a.en'}:4"
    (tmp_path / "b.de").write_text("eins\nzwei\ndrei\n")
    with pytest.raises(DataError) as e:
        read_parallel(tmp_path / "a.en", tmp_path / "b.de")
    assert str(e.value) == (f"{tmp_path / 'a.en'} has 4 lines but {tmp_path / 'b.de'} has 3: parallel files "
                            "must be line-aligned")


def test_parallel_config_and_multiline_csv(tmp_path, tok):
    """data.train + data.train_target read as pairs; a CSV with quoted multi-line fields (SAMSum's form) gives
    the whole dialogue, CRLF made LF, and its line numbers."""
    (tmp_path / "t.en").write_text("".join(f"{r['src']}\r\n" for r in pairs(6)))
    (tmp_path / "t.de").write_text("".join(f"{r['tgt']}\r\n" for r in pairs(6)))
    config = make_config(tmp_path, "default", tmp_path / "t.en", **{
        "data.train_target": str(tmp_path / "t.de"), "data.source_field": "source", "data.target_field": "target"})
    train, held = seq2seq.split(config)
    assert len(train) + len(held) == 6 and len(held) == 2
    assert seq2seq.texts(train[:1], config) == (["write this: " + pairs(6)[0]["src"]], [pairs(6)[0]["tgt"]])

    (tmp_path / "s.csv").write_bytes(b'id,summary,dialogue\r\n1,A fox jumps.,"A: the fox\r\nB: jumps"\r\n'
                                     b'2,"Owls, counting.","C: seven\r\nowls\r\n\r\ncount"\r\n')
    recs = read_records(tmp_path / "s.csv")
    config = make_config(tmp_path, "default", tmp_path / "s.csv", **{"data.source_field": "dialogue",
                                                                     "data.target_field": "summary"})
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["2", "4"]
    assert seq2seq.texts(recs, config) == (["write this: A: the fox\nB: jumps", "write this: C: seven\nowls\n\ncount"],
                                           ["A fox jumps.", "Owls, counting."])


def test_missing_field_names_file_line_and_field(tmp_path, tok):
    path = jsonl(tmp_path / "bad.jsonl", [{"src": "a dog", "tgt": "the dog"}, {"src": "a fox"}])
    config = make_config(tmp_path, "default", path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: missing field 'tgt' \(the record has: src"):
        seq2seq.decoder_arrays(read_records(path), config, tok)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: missing field 'tgt'"):
        seq2seq.t5_arrays(read_records(path), config, tok, 0)
    csv = tmp_path / "bad.csv"
    csv.write_text("id,dialogue\n1,\"A: hi\nB: hello\"\n")
    config = make_config(tmp_path, "default", csv, **{"data.source_field": "dialogue",
                                                      "data.target_field": "summary"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(csv))}:2: missing field 'summary' \(the record has: id, "
                                        "dialogue"):
        seq2seq.batches(config, tok)


# ---- T5 -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny random T5 v1.1 (gated-gelu, untied head) with the tiny tokenizer (pad 0, EOS 1 as T5's)."""
    tok = tiny.tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                                relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    path = tmp_path_factory.mktemp("s2s_t5")
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_t5_batches_and_loss_equal_transformers(tmp_path, t5_dir):
    from jaxft.models import t5

    model = checkpoint.load(t5_dir)
    tok = model.tokenizer
    rows, L = pairs(7), 16
    config = make_config(tmp_path, t5_dir, jsonl(tmp_path / "d.jsonl", rows),
                         **{"data.eval_fraction": 0.0, "train.seq_len": L, "train.batch_size": 7})
    train_iter, _, info = seq2seq.batches(config, tok)
    assert info["kind"] == "encoder-decoder"
    train, _ = seq2seq.split(config)
    arrays, stats = seq2seq.t5_arrays(train, config, tok, model.cfg.decoder_start_token_id)
    batch = next(train_iter)
    assert set(batch) == set(arrays)
    # Encoder rows: the prompt's tokens and EOS; decoder inputs: the targets shifted right behind the start id.
    def cut(ids):  # to L tokens keeping EOS last, as transformers' truncation
        return ids if len(ids) <= L else ids[:L - 1] + [1]

    for i, r in enumerate(rows):
        enc = cut(tok("write this: " + r["src"])["input_ids"] + [1])
        dec = cut(tok(r["tgt"])["input_ids"] + [1])
        assert arrays["tokens"][i].tolist() == enc + [0] * (L - len(enc))
        assert arrays["segment_ids"][i].tolist() == [1] * len(enc) + [0] * (L - len(enc))
        assert arrays["targets"][i].tolist() == dec + [0] * (L - len(dec))
        assert arrays["loss_mask"][i].tolist() == [1.0] * len(dec) + [0.0] * (L - len(dec))
    n_long = sum(len(tok("write this: " + r["src"])["input_ids"]) + 1 > L for r in rows)
    assert stats["cut_sources"] == n_long > 0 and stats["cut_targets"] < len(rows)
    np.testing.assert_array_equal(arrays["dec_tokens"], np.asarray(t5.shift_right(arrays["targets"], model.cfg)))

    hf = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    labels = torch.tensor(np.where(arrays["loss_mask"] > 0, arrays["targets"], -100)).long()
    np.testing.assert_array_equal(hf._shift_right(labels).numpy(), arrays["dec_tokens"])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(arrays["tokens"]).long(),
                 attention_mask=torch.tensor(arrays["segment_ids"]).long(), labels=labels).loss.item()
    fam = Model(family=t5, cfg=model.cfg)
    s, n = jax.jit(lambda b: seq2seq.loss(seq2seq.forward(fam, model.params, None, b), b))(arrays)
    assert float(n) == float(arrays["loss_mask"].sum())
    np.testing.assert_allclose(float(s) / float(n), ref, rtol=1e-5, atol=1e-5)
    # A padding row of an evaluation batch counts nothing, and does not turn the sum into NaN.
    padded = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in arrays.items()}
    s2, n2 = jax.jit(lambda b: seq2seq.loss(seq2seq.forward(fam, model.params, None, b), b))(padded)
    np.testing.assert_allclose([float(s2), float(n2)], [float(s), float(n)], rtol=1e-6)


def test_t5_evaluate_uses_t5_generate(tmp_path, t5_dir):
    from jaxft.models import t5

    model = checkpoint.load(t5_dir)
    tok = model.tokenizer
    config = make_config(tmp_path, t5_dir, jsonl(tmp_path / "d.jsonl", pairs(12)),
                         **{"data.eval_fraction": 0.5, "eval.metrics": "bleu", "eval.generate_max_new_tokens": 5,
                            "eval.batch_size": 6})
    _, eval_list, info = seq2seq.batches(config, tok)
    fam = Model(family=t5, cfg=model.cfg)

    @jax.jit
    def step(batch):
        out = seq2seq.forward(fam, model.params, None, batch)
        return (*seq2seq.loss(out, batch), seq2seq.predict(out, batch))

    ev = Eval(batches=eval_list, step=step, info=info, config=config, model=fam, base=model.params,
              tokenizer=tok)
    results = seq2seq.evaluate(ev)
    _, held = seq2seq.split(config)
    enc = [tok("write this: " + r.fields["src"])["input_ids"] + [1] for r in held]
    new = gen.generate(model.cfg, model.params, enc, max_new_tokens=5, eos_ids=[1])
    preds = [tok.decode(x, skip_special_tokens=True).strip() for x in new]
    refs = [r.fields["tgt"] for r in held]
    assert seq2seq.generate_texts(fam, model.params, None, tok, config, seq2seq.texts(held, config)[0]) == preds
    expected = metrics.bleu_chrf(preds, refs)
    assert set(results) == {"loss", "perplexity", "bleu", "chrf"}
    np.testing.assert_allclose([results["bleu"], results["chrf"]], [expected["bleu"], expected["chrf"]], rtol=1e-6)
    assert np.isfinite(results["loss"]) and results["perplexity"] == pytest.approx(np.exp(results["loss"]))


def test_t5_qlora_quantizes_both_stacks_and_trains(tmp_path, t5_dir):
    """quant.format=nf4 on T5 quantizes every linear weight of the encoder and the decoder (and nothing else),
    the run trains (the loss falls), and an include regex that matches no weight is a one-line error."""
    from jaxft import parallel, tree
    from jaxft.peft import lora
    from jaxft.quant import QuantizedWeight
    from jaxft.train.build import load_model
    from jaxft.train.loop import train

    data = jsonl(tmp_path / "d.jsonl", pairs(16))
    quantized = {"quant.format": "nf4", "quant.block_size": 8, "train.steps": 8, "train.learning_rate": 5e-3,
                 "train.warmup_steps": 0, "train.eval_every": 0, "lora.targets": "all-linear",
                 "eval.metrics": "bleu", "data.eval_fraction": 0.25}
    config = make_config(tmp_path, t5_dir, data, **quantized)
    model, _ = load_model(config, parallel.from_config(config), seq2seq)
    paths = [p for p, x in tree.items(model.params) if isinstance(x, QuantizedWeight)]
    assert paths == lora.target_paths(model.params, "all-linear", "t5")
    assert {p.split("/")[0] for p in paths} == {"encoder", "decoder"}
    summary = train(config, tmp_path / "run")
    history = summary["eval_history"]
    assert history[-1][1] < history[0][1], history

    config = make_config(tmp_path, t5_dir, data, **{**quantized, "quant.include": "layers/.*/w"})
    with pytest.raises(ValueError, match=r"^quant.include='layers/\.\*/w' matches no weight of .* named like "
                                         r"(en|de)coder/layers/"):
        load_model(config, parallel.from_config(config), seq2seq)
