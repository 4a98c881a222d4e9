"""`jaxft aot` for every family, not LLaMA alone: the run `jaxft train` would build (`build_run(abstract=True)`)
compiled for 8 simulated CPU devices (mesh 2 x 2 x 2) from a tiny BERT and T5 config.json (no weights, no data),
for the tasks each runs; XLA's per-device argument bytes equal those of the shards the run declares.

The 8-device part runs once, in a subprocess (`python tests/test_aot.py OUT.json`), so the rest of the suite
keeps its single device.
"""

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=8", "train.seq_len=16"]
# (family directory, config file, overrides): a task of each kind the families run
CASES = {  # (bert_classification, LoRA: through the command line, `test_aot_command_prints_the_memory_plan`)
    "bert_token_classification_ia3": ("bert", "minilm_conll_lora.py", ["peft.method=ia3"]),
    "bert_embedding": ("bert", "minilm_embed.py", []),
    "bert_mlm_full": ("bert", "minilm_sst2_lora.py", ["task=mlm", "peft.method=full", "train.learning_rate=1e-4"]),
    "t5_seq2seq_adapter_grad_accum": ("t5", "samsum_lora.py",
                                      ["train.grad_accum=2", "peft.method=adapter", "adapter.size=8"]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import tiny  # (not at the top: this file is also the subprocess's script, which needs no torch)
    import transformers

    root = tmp_path_factory.mktemp("aot")
    transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64).save_pretrained(root / "bert")
    transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                          num_heads=4, decoder_start_token_id=0).save_pretrained(root / "t5")
    return tiny.on_simulated_devices(__file__, root / "results.json")


@pytest.mark.parametrize("case", CASES)
def test_aot_compiles_every_family_and_task_on_eight_devices(results, case):
    r = results[case]
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2, "expert": 1}
    assert r["argument_bytes"] == r["declared_bytes"] > 0  # the shardings the run declares are the compiled ones
    assert r["temp_bytes"] > 0


def test_aot_command_prints_the_memory_plan(results):
    """`jaxft aot --topology cpu --model CONFIG_JSON` for a BERT classifier with LoRA: the memory plan as JSON."""
    cli = results["cli"]
    assert cli["exit"] == 0 and cli["report"]["topology"] == "cpu" and cli["report"]["devices"] == 8
    assert (cli["report"]["task"], cli["report"]["method"]) == ("classification", "lora")
    assert cli["report"]["argument_bytes"] == cli["declared_bytes"] > 0 and cli["report"]["temp_bytes"] > 0


def test_aot_refuses_a_plan_larger_than_the_device(results):
    r = results["small_device"]
    assert r["exit"] == 1 and r["stdout"] == ""
    line, = r["stderr"].strip().splitlines()
    assert line == (f"jaxft aot: the train step does not fit cpu: needs {r['planned_gib']:.2f} GiB per device, "
                    f"has {r['planned_gib'] * 0.9:.2f} GiB")


def _worker(out_path: str) -> None:
    import jax
    import numpy as np

    from jaxft import cli, config as config_lib
    from jaxft.checkpoint.hf import read_config
    from jaxft.train.run import build_run

    root = Path(out_path).parent
    def declared_bytes(run) -> int:  # per device, of the shards of every argument of the step
        args = jax.tree.leaves((run.state, run.base, run.batch))
        return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in args)

    results = {}
    for case, (fam, config_file, overrides) in CASES.items():
        t0 = time.perf_counter()
        config = config_lib.load(str(CONFIGS / config_file), MESH + overrides)
        run = build_run(config, abstract=True, model_config=read_config(root / fam))
        mem = run.train_step.lower(run.state, run.base, run.batch).compile().memory_analysis()
        results[case] = {"devices": len(run.layout.mesh.devices.flat), "mesh": dict(run.layout.mesh.shape),
                         "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
                         "declared_bytes": declared_bytes(run), "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    config_file, bert = str(CONFIGS / "minilm_sst2_lora.py"), root / "bert" / "config.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["aot", "--topology", "cpu", "--config", config_file, "--model", str(bert),
                         *(f"--config.{o}" for o in MESH)])
    run = build_run(config_lib.load(config_file, MESH), abstract=True, model_config=read_config(bert.parent))
    results["cli"] = {"exit": code, "report": json.loads(stdout.getvalue().strip().splitlines()[-1]),
                      "declared_bytes": declared_bytes(run), "seconds": time.perf_counter() - t0}
    # The same step against a device smaller than its plan: one line, exit 1 (the compiler itself does not
    # refuse every step that would not fit: libtpu compiled 8B steps planning 19 GiB for a 15.75 GiB chip).
    planned = sum(results["cli"]["report"][k] for k in ("argument_bytes", "output_bytes", "temp_bytes"))
    planned -= results["cli"]["report"]["alias_bytes"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["aot", "--topology", "cpu", "--config", config_file, "--model", str(bert),
                         "--memory-gib", str(planned / 2**30 * 0.9), *(f"--config.{o}" for o in MESH)])
    results["small_device"] = {"exit": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                               "planned_gib": planned / 2**30}
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _worker(sys.argv[1])
