"""Two processes x 4 CPU devices on localhost (jax.distributed, gloo) train as one process does: the same
losses and adapter, each process reading only its half of every batch; a checkpoint written by both
processes together resumes exactly."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import tiny
from jaxft import config as config_lib, tree
from jaxft.peft import io as adapter_io
from jaxft.train.loop import train

HERE = os.path.dirname(__file__)
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]  # batch over data*fsdp spans both processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    return tiny.llama_dir(root / "model"), tiny.alpaca_file(root / "train.jsonl", 80)


def _overrides(setup, steps):
    model, data = setup
    return [f"model={model}", f"data.train={data}", "dtype=float32", "param_dtype=float32", "train.batch_size=4",
            "train.seq_len=32", f"train.steps={steps}", "train.eval_every=3", "train.save_every=3",
            "train.eval_batches=2", "train.learning_rate=1e-2", "train.warmup_steps=0",
            "train.schedule=constant", "lora.rank=4", "lora.dropout=0.1"]


def _launch(workdir, overrides, resume=False):
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")  # faster compiles
    args = [f"127.0.0.1:{port}", str(workdir), "resume" if resume else "fresh", str(workdir.parent / "jit_cache"),
            *overrides]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_and_resume_as_one(setup, tmp_path):
    reference = train(config_lib.load(os.path.join(HERE, "..", "configs", "default_lora.py"),
                                      _overrides(setup, 6)), tmp_path / "one")
    assert reference["status"] == "completed"
    ref_rows = _metrics(tmp_path / "one")

    workdir = tmp_path / "two"
    outs = _launch(workdir, _overrides(setup, 3) + MESH)
    assert all("completed at step 3" in out for out in outs)
    assert (workdir / "checkpoints" / "3").is_dir()
    outs = _launch(workdir, _overrides(setup, 6) + MESH, resume=True)
    assert all("completed at step 6" in out for out in outs)

    rows = _metrics(workdir)  # written by process 0 alone: one row per step
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    for key in ("loss", "eval_loss"):
        ref = {r["step"]: r[key] for r in ref_rows if key in r}
        got = {r["step"]: r[key] for r in rows if key in r}
        assert sorted(got) == sorted(ref)
        np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], atol=1e-5,
                                   err_msg=key)
    a = tree.flatten(adapter_io.load(tmp_path / "one" / "adapter")[0])
    b = tree.flatten(adapter_io.load(workdir / "adapter")[0])
    assert sorted(a) == sorted(b)
    for path in a:
        np.testing.assert_allclose(np.asarray(b[path]), np.asarray(a[path]), atol=1e-5, err_msg=path)


TPU = os.path.join(HERE, "..", "tpu_scripts", "tpu.sh")


def test_tpu_scripts_parse_and_print_their_gcloud_commands():
    subprocess.run(["bash", "-n", TPU], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", TPU], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout

    def dry(*args):
        proc = subprocess.run(["bash", TPU, "--dry-run", "--name", "ft", "--zone", "us-east5-a", *args],
                              capture_output=True, text=True, env=dict(os.environ, TMPDIR="/tmp"))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    zone = "--zone=us-east5-a"
    assert dry("create", "--type", "v5litepod-16", "--spot") == [
        "gcloud compute tpus tpu-vm create ft --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot "
        + zone]
    for tpu_type, version in (("v4-32", "tpu-ubuntu2204-base"), ("v5p-8", "v2-alpha-tpuv5"),
                              ("v6e-8", "v2-alpha-tpuv6e")):
        assert f"--version={version}" in dry("create", "--type", tpu_type)[0]
    setup = dry("setup", "--bucket", "bkt")
    assert setup[0].startswith("git -C ") and setup[0].endswith(" archive --format=tar.gz -o /tmp/jaxft-src.tar.gz "
                                                                "HEAD")
    assert "tpu-vm scp /tmp/jaxft-src.tar.gz ft:jaxft-src.tar.gz --worker=all" in setup[1]
    assert setup[2].startswith("gcloud compute tpus tpu-vm ssh ft --worker=all --command=")
    assert "pip\\ install\\ -q\\ -e\\ .\\ \\'jax\\[tpu\\]" in setup[2]
    assert "gcsfuse\\ --implicit-dirs\\ bkt\\ /mnt/bkt" in setup[3]
    train_cmds = dry("train", "--config", "configs/default_lora.py", "--data", "d.jsonl", "--workdir",
                     "/mnt/bkt/r1", "--", "--config.mesh.fsdp=-1", "--config.mesh.data=1")
    assert train_cmds[0].endswith(f"scp configs/default_lora.py ft:jaxft-config.py --worker=all {zone}")
    assert train_cmds[1].endswith(f"scp d.jsonl ft:jaxft-data-d.jsonl --worker=all {zone}")
    start = train_cmds[2]
    assert start.startswith("gcloud compute tpus tpu-vm ssh ft --worker=all --command=") and start.endswith(zone)
    for part in ("jaxft\\ train\\ --config\\ ../jaxft-config.py\\ --workdir\\ /mnt/bkt/r1",
                 "--config.data.train=../jaxft-data-d.jsonl", "--config.mesh.fsdp=-1\\ --config.mesh.data=1",
                 "nohup", "\\&"):
        assert part in start
    assert dry("logs", "--worker", "2") == [
        f"gcloud compute tpus tpu-vm ssh ft --worker=2 --command=tail\\ -n\\ +1\\ -F\\ jaxft-train.log {zone}"]
    assert dry("fetch", "--workdir", "/mnt/bkt/r1", "--to", "out") == [
        f"gcloud compute tpus tpu-vm scp --recurse ft:/mnt/bkt/r1 out --worker=0 {zone}"]
    assert dry("delete") == [f"gcloud compute tpus tpu-vm delete ft --quiet {zone}"]
    bad = subprocess.run(["bash", TPU, "--dry-run", "create", "--type", "v3-8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown accelerator type 'v3-8'" in bad.stderr
