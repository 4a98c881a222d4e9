"""Task heads against transformers' *ForSequenceClassification / *ForTokenClassification with the same weights
(tiny Llama and BERT, padded batches), the contrastive loss against sentence-transformers, and the task data:
labels and their errors, CoNLL reading, IOB1 -> IOB2, word -> sub-word label alignment."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny
from jaxft import checkpoint
from jaxft.data import DataError
from jaxft.models import family_of
from jaxft.data import rows
from jaxft.tasks import Model, classification, embedding, token_classification

TEXTS = ["the quick brown fox jumps over a lazy dog", "seven wise owls", "count stars at night while the fox"]
T = 12
BERT_WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] the quick brown fox jump over a lazy dog seven wise owl count star at "
              "night while ##es ##s ##ing ##ed").split()


def bert_dir(path, seed=0):
    """A 2-layer BERT (hidden 32, with pooler) and a WordPiece fast tokenizer whose pieces are known."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    from tokenizers import BertWordPieceTokenizer
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=True)._tokenizer,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tiny.llama_dir(tmp_path_factory.mktemp("llama") / "model")
    return path, checkpoint.load(path)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path, model = bert_dir(tmp_path_factory.mktemp("bert") / "model")
    return path, model, checkpoint.load(path)


def _ours(task, loaded, head, batch):
    model = Model(family=family_of(loaded.cfg), cfg=loaded.cfg)
    fn = jax.jit(lambda base, trainable, b: task.forward(model, base, trainable, b))
    return np.asarray(fn(loaded.params, {"head": head}, {k: jnp.asarray(v) for k, v in batch.items()}))


def _torch(x):
    return {"w": jnp.asarray(x.weight.detach().numpy().T), **({"b": jnp.asarray(x.bias.detach().numpy())}
                                                             if x.bias is not None else {})}


def test_decoder_heads_equal_transformers(llama):
    path, loaded = llama
    batch = classification.encode(loaded.tokenizer, TEXTS, T)
    assert (batch["segment_ids"] == 0).any()  # padded rows
    ids, mask = torch.tensor(batch["tokens"], dtype=torch.long), torch.tensor(batch["segment_ids"])
    torch.manual_seed(1)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(
        path, num_labels=3, pad_token_id=loaded.tokenizer.pad_token_id).eval()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    assert hf.score.bias is None
    got = _ours(classification, loaded, {"score": _torch(hf.score)}, batch)
    np.testing.assert_allclose(got, want, atol=1e-4)

    hf = transformers.LlamaForTokenClassification.from_pretrained(path, num_labels=5).eval()
    with torch.no_grad():
        hf.score.bias.normal_()
        want = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    got = _ours(token_classification, loaded, {"score": _torch(hf.score)}, batch)
    keep = batch["segment_ids"] == 1
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4)


def test_encoder_heads_equal_transformers(bert):
    path, base_model, loaded = bert
    batch = classification.encode(loaded.tokenizer, TEXTS, T)
    assert (batch["segment_ids"] == 0).any() and (batch["tokens"] > 4).sum() > 10  # padding, and real pieces
    ids, mask = torch.tensor(batch["tokens"], dtype=torch.long), torch.tensor(batch["segment_ids"])
    torch.manual_seed(1)
    cfg = base_model.config
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**{**cfg.to_dict(), "num_labels": 3}))
    hf.bert.load_state_dict(base_model.state_dict())
    hf.eval()
    with torch.no_grad():
        hf.classifier.bias.normal_()
        want = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    got = _ours(classification, loaded, {"classifier": _torch(hf.classifier)}, batch)
    np.testing.assert_allclose(got, want, atol=1e-4)

    hf = transformers.BertForTokenClassification(transformers.BertConfig(**{**cfg.to_dict(), "num_labels": 5}))
    hf.bert.load_state_dict(base_model.state_dict(), strict=False)  # no pooler in the token head
    hf.eval()
    with torch.no_grad():
        hf.classifier.bias.normal_()
        want = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    got = _ours(token_classification, loaded, {"classifier": _torch(hf.classifier)}, batch)
    keep = batch["segment_ids"] == 1
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4)


def test_heads_initialize_as_their_transformers_modules(llama, bert):
    key = jax.random.PRNGKey(0)
    dec = classification.init_head(key, llama[1].cfg, None, 3)
    enc = classification.init_head(key, bert[2].cfg, None, 3)
    assert set(dec) == {"score"} and set(dec["score"]) == {"w"}  # LlamaForSequenceClassification: no bias
    assert set(enc) == {"classifier"} and not np.asarray(enc["classifier"]["b"]).any()
    assert abs(float(jnp.std(dec["score"]["w"])) - 0.02) < 0.005
    assert set(token_classification.init_head(key, llama[1].cfg, None, 5)["score"]) == {"w", "b"}


def test_contrastive_loss_equals_sentence_transformers():
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rng = np.random.RandomState(0)
    a, p = rng.randn(6, 16).astype(np.float32), rng.randn(6, 16).astype(np.float32)
    want = float(MultipleNegativesRankingLoss(model=None).compute_loss_from_embeddings(
        [torch.tensor(a), torch.tensor(p)], None))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    ones = np.ones((6, 4), np.int32)
    batch = {"segment_ids": ones, "pair_segment_ids": ones}
    total, count = embedding.loss({"a": jnp.asarray(unit(a)), "p": jnp.asarray(unit(p))}, batch)
    np.testing.assert_allclose(float(total) / float(count), want, rtol=1e-5)
    # Padding rows (an evaluation batch's last) are neither anchors nor candidates: the loss of the first 4.
    want4 = float(MultipleNegativesRankingLoss(model=None).compute_loss_from_embeddings(
        [torch.tensor(a[:4]), torch.tensor(p[:4])], None))
    padded = {"segment_ids": ones.copy(), "pair_segment_ids": ones.copy()}
    padded["segment_ids"][4:] = 0
    padded["pair_segment_ids"][4:] = 0
    total, count = embedding.loss({"a": jnp.asarray(unit(a)), "p": jnp.asarray(unit(p))}, padded)
    assert float(count) == 4
    np.testing.assert_allclose(float(total) / 4, want4, rtol=1e-5)


def test_embedding_vectors_are_mean_pooled_and_normalized(bert):
    _, model, loaded = bert
    batch = classification.encode(loaded.tokenizer, TEXTS, T)
    m = Model(family=family_of(loaded.cfg), cfg=loaded.cfg)
    got = np.asarray(embedding.embed(m, loaded.params, None, {k: jnp.asarray(v) for k, v in batch.items()}))
    mask = torch.tensor(batch["segment_ids"])
    with torch.no_grad():
        h = model(input_ids=torch.tensor(batch["tokens"], dtype=torch.long), attention_mask=mask).last_hidden_state
    mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # sentence-transformers' Pooling + Normalize
    want = torch.nn.functional.normalize(mean, dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


# --- data ---

class _Cfg(dict):
    """A stand-in for the config: attribute access and `in`."""
    __getattr__ = dict.__getitem__


def _config(train, eval_="", labels="", **data):
    d = _Cfg({"train": str(train), "eval": str(eval_), "eval_fraction": 0.0, "text_field": "sentence",
              "label_field": "label", "labels": labels, "tag_scheme": "iob2", **data})
    return _Cfg(data=d, train=_Cfg(seq_len=T, batch_size=2), eval=_Cfg(batch_size=0, max_examples=0), seed=0)


def test_classification_labels_from_files_and_errors(tmp_path, llama):
    tok = llama[1].tokenizer
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\nthe fox \t1 \nseven owls \t0\na dog \t1\n")  # SST-2's spaces before tabs
    _, _, info = classification.batches(_config(tsv), tok)
    assert info["labels"] == ["0", "1"]
    stream, _, _ = classification.batches(_config(tsv, labels="1,0"), tok)
    batch = next(stream)
    assert sorted(batch["labels"].tolist()) in ([0, 1], [0, 0])  # "1" is class 0 when declared first
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": s, "label": lab}) + "\n"
                             for s, lab in [("the fox", "pos"), ("owls", "neg"), ("a dog", "pos")]))
    _, evals, info = classification.batches(_config(jsonl, eval_=jsonl), tok)
    assert info["labels"] == ["neg", "pos"] and evals[-1]["labels"].tolist() == [1, rows.IGNORE]  # padded row
    with pytest.raises(DataError, match=r"train.tsv:2: label '1' .*not in the label set \[0, 2\]"):
        classification.batches(_config(tsv, labels="0,2"), tok)
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,score\nthe fox,1\n")
    with pytest.raises(DataError, match=r"bad.csv:2: no 'label' field \(data.label_field\); the record has "
                                        r"'sentence', 'score'"):
        classification.batches(_config(bad), tok)
    with pytest.raises(DataError, match=r"eval.tsv:2: label 'maybe'"):
        (tmp_path / "eval.tsv").write_text("sentence\tlabel\nthe owl\tmaybe\n")
        classification.batches(_config(tsv, eval_=tmp_path / "eval.tsv"), tok)


def test_iob1_to_iob2():
    assert token_classification.iob1_to_iob2(
        ["I-PER", "I-PER", "B-PER", "I-PER", "O", "I-LOC", "I-ORG", "B-ORG", "O", "B-MISC"]) == \
        ["B-PER", "I-PER", "B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-ORG", "O", "B-MISC"]
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]
    assert token_classification.iob1_to_iob2(iob2) == iob2  # IOB2 is valid IOB1 and converts to itself


CONLL = """-DOCSTART- -X- -X- O

EU NNP I-NP I-ORG
rejects VBZ I-VP O
German JJ I-NP I-MISC
lamb NN I-NP O

Peter NNP I-NP I-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O
"""


def test_conll_reading_and_errors(tmp_path):
    f = tmp_path / "eng.train"
    f.write_text(CONLL)
    sents = token_classification.read(f, _config(f, tag_scheme="iob1"))
    assert [s.words for s in sents] == [["EU", "rejects", "German", "lamb"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sents] == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
    assert sents[1].where[0] == f"{f}:8"
    f.write_text(CONLL.replace("rejects VBZ I-VP O", "rejects"))
    with pytest.raises(DataError, match=r"eng.train:4: one column \('rejects'\)"):
        token_classification.read(f, _config(f))
    f.write_text(CONLL.replace("I-PER\n\n", "PER\n\n"))
    with pytest.raises(DataError, match=r"eng.train:9: tag 'PER' is not O, B-<type> or I-<type>"):
        token_classification.read(f, _config(f))
    j = tmp_path / "ner.jsonl"
    j.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "B-PER"]}) + "\n"
                 + json.dumps({"tokens": ["a", "b", "c"], "tags": ["O", "O"]}) + "\n")
    with pytest.raises(DataError, match=r"ner.jsonl:2: 3 words \('tokens'\) but 2 tags \('tags'\)"):
        token_classification.read(j, _config(j, text_field="tokens", label_field="tags"))
    with pytest.raises(DataError, match=r"ner.jsonl:1: no list 'words'"):
        token_classification.read(j, _config(j, text_field="words", label_field="tags"))


def test_label_alignment_to_word_pieces(bert):
    tok = bert[2].tokenizer
    names = ["O", "B-PER", "I-PER", "B-LOC"]
    S = token_classification.Sentence
    sent = S(["the", "foxes", "jumping", "owl"], ["O", "B-PER", "I-PER", "B-LOC"], ["f:1", "f:2", "f:3", "f:4"])
    arrays, cut = token_classification.encode(tok, [sent], names, 10)
    pieces = tok.convert_ids_to_tokens(arrays["tokens"][0][arrays["segment_ids"][0] == 1].tolist())
    assert pieces == ["[CLS]", "the", "fox", "##es", "jump", "##ing", "owl", "[SEP]"]
    I = rows.IGNORE
    assert arrays["labels"][0].tolist() == [I, 0, 1, I, 2, I, 3, I, I, I] and cut == 0
    # Cut to 5 tokens: [CLS] the fox ##es [SEP]; "jumping" and "owl" are lost (counted), [SEP] ignored.
    arrays, cut = token_classification.encode(tok, [sent], names, 5)
    assert arrays["labels"][0].tolist() == [I, 0, 1, I, I] and cut == 2
    assert token_classification.align([None, 0, 0, 1, None], [5, 6]) == [I, 5, I, 6, I]
    with pytest.raises(DataError, match=r"f:4: tag 'B-LOC' is not in the label set"):
        token_classification.encode(tok, [sent], names[:3], 10)


def test_a_model_of_the_wrong_kind_is_refused_before_loading(tmp_path, bert):
    from jaxft import config as config_lib
    from jaxft.tasks import TaskError
    from jaxft.train.loop import train

    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    base = tmp_path / "unread.jsonl"  # not JSON, never read: the model's kind is checked first
    base.write_text("{not json")
    for file, model, message in [
            ("default_lora.py", tmp_path / "t5", r"t5: an encoder-decoder model \(t5\) cannot run task 'causal_lm', "
                                                 r"which needs decoder models"),
            ("minilm_sst2_lora.py", tmp_path / "t5", r"cannot run task 'classification', which needs encoder or "
                                                     r"decoder models"),
            ("default_lora.py", bert[0], r"an encoder model \(bert\) cannot run task 'causal_lm'")]:
        config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", file),
                                 [f"model={model}", f"data.train={base}"])
        with pytest.raises(TaskError, match=message):
            train(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()
