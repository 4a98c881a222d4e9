"""Feature-based fine-tuning (peft.method=features) on the encoder families: the pooled features of a tiny random
BERT equal transformers' BertModel hidden states (mean and [CLS], a middle block and the last), those of a tiny
T5 the T5EncoderModel's (final layer norm applied); a short run on a tiny BERT trains a head that classifies, its
features cached per model; bad layers and pools are refused by config key. (The LLaMA path: test_methods.py.)"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny
from jaxft import checkpoint, cli, config as config_lib
from jaxft.models import bert, t5
from jaxft.models.config import LlamaConfig
from jaxft.peft import features
from jaxft.peft import io as adapter_io
from jaxft.peft.method import PeftError
from jaxft.train.loop import train
from jaxft.train.workdir import WorkdirError
from test_tasks import bert_dir

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "minilm_sst2_lora.py")
rs = np.random.RandomState(0)
TOKENS = rs.randint(5, 64, (3, 10)).astype(np.int32)
SEGMENTS = np.array([[1] * 10, [1] * 7 + [0] * 3, [1] * 3 + [0] * 7], np.int32)  # right padded, as `extract` pads
TOKENS = TOKENS * SEGMENTS


def _mean(hidden, segments=SEGMENTS):
    """transformers hidden states (B, T, D) -> (B, D): the mean over the real tokens."""
    m = torch.tensor(segments, dtype=torch.float32)[..., None]
    return ((hidden * m).sum(1) / m.sum(1)).numpy()


def _ours(loaded, layer, pool):
    return np.asarray(features.pooled(loaded.cfg, loaded.params, jnp.asarray(TOKENS), jnp.asarray(SEGMENTS),
                                      layer=layer, pool=pool))


@pytest.fixture(scope="module")
def bert3(tmp_path_factory):
    """A 3-layer random BertModel (non-trivial biases and norms) and the same weights loaded by jaxft."""
    path = tmp_path_factory.mktemp("bert3")
    model = tiny.bert(path, layers=3, perturb=True)
    return model, checkpoint.load(path)


def test_bert_features_equal_transformers_hidden_states(bert3):
    model, loaded = bert3
    with torch.no_grad():
        hs = model(torch.tensor(TOKENS), attention_mask=torch.tensor(SEGMENTS), output_hidden_states=True)
    for layer, index in ((1, 2), (-1, 3)):  # hidden_states[0] is the embeddings: block i's output is [i + 1]
        np.testing.assert_allclose(_ours(loaded, layer, "mean"), _mean(hs.hidden_states[index]), atol=1e-4)
        np.testing.assert_allclose(_ours(loaded, layer, "cls"), hs.hidden_states[index][:, 0].numpy(), atol=1e-4)
    last = [np.asarray(hs.last_hidden_state[i, SEGMENTS[i].sum() - 1]) for i in range(3)]
    np.testing.assert_allclose(_ours(loaded, -1, "last"), np.stack(last), atol=1e-4)


def test_t5_features_equal_the_encoders_output(tmp_path):
    """The last block: T5EncoderModel's last_hidden_state (final layer norm applied); a middle block: its hidden
    state through the encoder's final layer norm, as the features of every block are read."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=1)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    encoder = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
    loaded = checkpoint.load(tmp_path)
    with torch.no_grad():
        out = encoder(torch.tensor(TOKENS), attention_mask=torch.tensor(SEGMENTS), output_hidden_states=True)
        middle = encoder.encoder.final_layer_norm(out.hidden_states[2])
    np.testing.assert_allclose(_ours(loaded, -1, "mean"), _mean(out.last_hidden_state), atol=1e-4)
    np.testing.assert_allclose(_ours(loaded, 1, "mean"), _mean(middle), atol=1e-4)
    np.testing.assert_allclose(_ours(loaded, 2, "cls"), out.last_hidden_state[:, 0].numpy(), atol=1e-4)


LLAMA = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
BERT = bert.Config(vocab_size=64, dim=32, n_layers=6, n_heads=4, mlp_dim=48)
T5 = t5.Config(vocab_size=64, dim=32, n_layers=3, n_decoder_layers=2, n_heads=4, head_dim=8, mlp_dim=48)


@pytest.mark.parametrize("cfg, layer, pool, message", [
    (BERT, 6, "mean", "features.layer: 6 is not a block of this model (bert, 6 layers: 0..5, or -1..-6 from the end)"),
    (BERT, -7, "cls", "features.layer: -7 is not a block of this model (bert, 6 layers"),
    (T5, 3, "mean", "features.layer: 3 is not a block of this model (t5, 3 encoder layers: 0..2"),
    (LLAMA, 2, "last", "features.layer: 2 is not a block of this model (llama, 2 layers: 0..1"),
    (LLAMA, -1, "cls", "features.pool: 'cls' (the first token) is for encoders; a decoder's (llama) first token sees "
                       "only itself: use mean or last"),
    (BERT, 0, "max", "features.pool: 'max' is not one of mean, last, cls"),
])
def test_bad_layer_or_pool_is_named(cfg, layer, pool, message):
    with pytest.raises(PeftError) as e:
        features.make_spec(cfg, layer, pool, ["a", "b"], 16)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_pools_and_layers_each_family_accepts():
    assert features.make_spec(BERT, -1, "cls", ["a", "b"], 16) == features.FeatureSpec(5, "cls", ("a", "b"), 16)
    assert features.make_spec(T5, -3, "last", ["a", "b"], 16).layer == 0
    assert features.make_spec(LLAMA, 1, "mean", ["a", "b"], 16).layer == 1


def _data(path, rng, n=60):
    """Label 0 texts are animals, label 1 the night sky (words of the tiny BERT vocabulary)."""
    animals, sky = ["fox", "dog", "lazy", "brown", "jump"], ["owl", "star", "night", "seven", "count"]
    lines = ["sentence\tlabel"] + [f"{' '.join(rng.choice(words, 4))}\t{label}"
                                   for _ in range(n) for label, words in ((0, animals), (1, sky))]
    path.write_text("\n".join(lines) + "\n")
    return animals, sky


def test_bert_features_run_trains_a_head_that_classifies(tmp_path, monkeypatch, capsys):
    """Through `jaxft train`: the held-out loss falls and the head separates the classes; the saved head
    classifies new texts as `predict` does; the cache is reused for the same model and not for another one
    saved at the same path; `jaxft eval` scores the saved head on the same held-out texts as training did."""
    path, _ = bert_dir(tmp_path / "model")
    rng = np.random.RandomState(0)
    animals, sky = _data(tmp_path / "train.tsv", rng)
    overrides = [f"model={path}", f"data.train={tmp_path / 'train.tsv'}", "peft.method=features", "dtype=float32",
                 "param_dtype=float32", "train.seq_len=12", "train.batch_size=16", "train.steps=40",
                 "train.eval_every=20", "train.learning_rate=3e-2", "train.warmup_steps=0",
                 "train.log_every=1", "data.eval_fraction=0.2"]  # mean pooling: a random BERT's [CLS] hardly depends on the words
    config = config_lib.load(CONFIG, overrides)
    summary = train(config, tmp_path / "run")
    history = summary["eval_history"]
    assert [h[0] for h in history] == [0, 20, 40] and history[-1][1] < 0.5 * history[0][1], history
    assert summary["eval_metrics"]["accuracy"] >= 0.9
    assert summary["data"] == {"labels": ["0", "1"], "train_examples": 96, "eval_examples": 24}
    assert {"loss.png", "eval_accuracy.png"} <= {p.name for p in (tmp_path / "run" / "plots").iterdir()}
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    head, spec, meta = adapter_io.load(tmp_path / "run" / "adapter")
    assert meta["method"] == "features" and spec == features.FeatureSpec(1, "mean", ("0", "1"), 12)
    loaded = checkpoint.load(path)
    texts = [" ".join(rng.choice(animals, 4)), " ".join(rng.choice(sky, 4)), " ".join(rng.choice(sky, 3))]
    assert features.classify(loaded.cfg, loaded.params, loaded.tokenizer, head, spec, texts) == ["0", "1", "1"]
    ids = features.tokenize(loaded.tokenizer, texts, spec.seq_len)
    assert all(row[0] == loaded.tokenizer.cls_token_id and row[-1] == loaded.tokenizer.sep_token_id for row in ids)
    logits = features.predict(loaded.cfg, loaded.params, head, spec, *features.pad_right(ids, 3, spec.seq_len))
    np.testing.assert_allclose(logits, features.apply_head(head, features.extract(loaded.cfg, loaded.params, ids,
                                                                                 spec)), atol=1e-5)

    calls = []
    real_extract = features.extract
    monkeypatch.setattr(features, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    before = {f: (tmp_path / "run" / f).read_bytes() for f in ("config.json", "summary.json", "metrics.jsonl")}
    with pytest.raises(WorkdirError, match=r"already holds a run \(config\.json, checkpoints/, metrics\.jsonl, "
                                           r"summary\.json, adapter.*Pass --resume"):  # a fresh run never replaces a finished one
        train(config, tmp_path / "run")
    assert {f: (tmp_path / "run" / f).read_bytes() for f in before} == before
    again = train(config, tmp_path / "run", resume=True)  # a finished run: features read back, no step run
    assert not calls and again["eval_history"] == [list(h) for h in summary["eval_history"]]  # not recomputed
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]  # one row per step

    capsys.readouterr()
    assert cli.main(["eval", "--config", CONFIG, "--workdir", str(tmp_path / "run")]
                    + [f"--config.{o}" for o in overrides]) == 0
    scored = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert scored == again["eval_metrics"]  # the same evaluator on the same cached features
    assert set(scored) == {"loss", "accuracy", "precision", "recall", "f1"} and not calls
    assert "accuracy" in capsys.readouterr().out  # the table
    cached = np.load(tmp_path / "run" / "features" / "train.npy")
    bert_dir(path, seed=1)  # another checkpoint at the same path: its own features
    stamp = (path / "model.safetensors").stat()
    os.utime(path / "model.safetensors", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    train(config, tmp_path / "run", resume=True)
    assert len(calls) == 2 and np.abs(np.load(tmp_path / "run" / "features" / "train.npy") - cached).max() > 1e-3


def test_features_run_continues_from_a_saved_head(tmp_path):
    """peft.init_from: a features run starts from another run's head (trained on the same features and
    classes); one with other settings is refused, naming the key."""
    path, _ = bert_dir(tmp_path / "model")
    _data(tmp_path / "train.tsv", np.random.RandomState(0))
    common = [f"model={path}", f"data.train={tmp_path / 'train.tsv'}", "peft.method=features", "dtype=float32",
              "param_dtype=float32", "train.seq_len=12", "train.batch_size=16", "train.warmup_steps=0",
              "data.eval_fraction=0.2", "train.eval_every=0"]
    first = train(config_lib.load(CONFIG, common + ["train.steps=30", "train.learning_rate=3e-2"]), tmp_path / "a")
    assert first["eval_metrics"]["accuracy"] >= 0.9
    # no steps: the continued run's head is exactly the saved one, so its step-0 evaluation is the end of the
    # first run's
    again = train(config_lib.load(CONFIG, common + ["train.steps=0",
                                                    f"peft.init_from={tmp_path / 'a'}"]), tmp_path / "b")
    assert again["eval_history"][0][1:] == first["eval_history"][-1][1:]
    head, _, _ = adapter_io.load(tmp_path / "b" / "adapter")
    saved, _, _ = adapter_io.load(tmp_path / "a" / "adapter")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(head), jax.tree.leaves(saved)))
    with pytest.raises(ValueError, match=r"^peft.init_from: .* was trained with .*pool='mean'.*pool='last'"):
        train(config_lib.load(CONFIG, common + ["train.steps=1", "features.pool=last",
                                                f"peft.init_from={tmp_path / 'a'}"]), tmp_path / "c")
