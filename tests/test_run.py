"""`jaxft.train.run.build_run`: the abstract run (`jaxft aot`'s) is the concrete run (`jaxft train`'s) without
its values. For each task, on a tiny checkpoint and data file, the abstract batch has the keys, shapes and dtypes
of the task's real batches, and the abstract base, trainable tree and state those of the loaded ones."""

import json
import os

import jax
import numpy as np
import pytest

import tiny
from jaxft import config as config_lib
from jaxft.train.run import build_run
from test_task_classification_run import sst2_file
from test_task_ner_run import conll_file
from test_tasks import BERT_WORDS, bert_dir

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
COMMON = ["dtype=float32", "param_dtype=float32", "train.batch_size=4", "train.seq_len=16", "lora.rank=4",
          "data.eval_fraction=0.25"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    words = BERT_WORDS[5:]
    rows = [{"question": " ".join(words[(i + j) % 20] for j in range(4)),
             "answer": " ".join(words[(i * 3 + j) % 20] for j in range(3))} for i in range(32)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": r["question"]}) + "\n" for r in rows))
    return {"llama": tiny.llama_dir(root / "llama"), "bert": bert_dir(root / "bert")[0],
            "alpaca": tiny.alpaca_file(root / "alpaca.jsonl", 32), "sst2": sst2_file(root / "sst2.tsv", 32),
            "conll": conll_file(root / "eng.train", 32, 0), "pairs": root / "pairs.jsonl",
            "text": root / "text.jsonl"}


CASES = {  # task -> (config file, model, data, overrides)
    "causal_lm": ("default_lora.py", "llama", "alpaca", ["train.grad_accum=2", "train.seq_len=64"]),
    "classification": ("minilm_sst2_lora.py", "llama", "sst2", []),
    "token_classification": ("minilm_conll_lora.py", "bert", "conll", ["peft.method=ia3"]),
    "embedding": ("minilm_embed.py", "bert", "pairs", ["data.text_field=question", "data.pair_field=answer"]),
    "mlm": ("default_lora.py", "bert", "text", ["task=mlm", "peft.method=full", "train.learning_rate=1e-4"]),
}


def _shapes(tree_) -> dict:
    return jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype).name), tree_)


@pytest.mark.parametrize("task", CASES)
def test_the_abstract_run_is_the_concrete_run_without_values(files, task):
    config_file, model, data, extra = CASES[task]
    overrides = COMMON + [f"model={files[model]}", f"data.train={files[data]}", *extra]
    concrete = build_run(config_lib.load(os.path.join(CONFIGS, config_file), overrides))
    if "labels" in concrete.info:  # an abstract run reads no data: its head has the classes of data.labels
        overrides.append(f"data.labels={','.join(concrete.info['labels'])}")
    abstract = build_run(config_lib.load(os.path.join(CONFIGS, config_file), overrides), abstract=True)
    assert concrete.task_name == abstract.task_name == task
    assert _shapes(abstract.batch) == _shapes(concrete.batch)  # the task's keys (`run.BATCH_KEYS`)
    assert _shapes(abstract.base) == _shapes(concrete.base)  # the family's init == its checkpoint
    assert _shapes(abstract.state) == _shapes(concrete.state)
    assert abstract.spec == concrete.spec
    # The concrete step runs on its first batch, and the abstract one lowers for the same shapes.
    state, metrics = concrete.train_step(concrete.state, concrete.base, concrete.put(next(concrete.train_data)))
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 1
    abstract.train_step.lower(abstract.state, abstract.base, abstract.batch)


def test_without_data_the_batch_is_abstract_and_filled_by_the_caller(files):
    """build_run(data=False) (the benchmarks): the model is read, no data; a synthetic batch of the abstract
    batch's shapes trains, with the loss of the task on it."""
    config = config_lib.load(os.path.join(CONFIGS, "default_lora.py"),
                             COMMON + [f"model={files['llama']}", "data.train=/nonexistent.jsonl"])
    run = build_run(config, data=False)
    assert run.train_data is None and run.evaluate is None
    rng = np.random.RandomState(0)
    host = {k: rng.randint(1, 100, x.shape[1:]).astype(x.dtype) for k, x in run.batch.items()}
    host["loss_mask"] = np.ones_like(host["loss_mask"])
    total, count = run.task.loss(run.task.forward(run.model, run.base, run.trainable, host, None), host)
    state, metrics = run.train_step(run.state, run.base, run.put(host))  # (donates the state)
    np.testing.assert_allclose(float(metrics["loss"]), float(total / count), rtol=1e-5)
