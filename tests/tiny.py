"""Tiny real checkpoints for end-to-end tests: a random-weight transformers Llama and a trained BPE tokenizer
with a ChatML template, saved side by side as a Hugging Face model directory."""

import hashlib
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls count stars at night "
         "write this date in words january february march april may june july").split()


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|endoftext|>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                                chat_template=CHATML)


def perturbed(model, seed: int = 0, also: tuple[str, ...] = ("LayerNorm", "layer_norm")):
    """`model` with non-trivial biases and norms (transformers initializes them at 0 and 1), in eval mode:
    every bias and every parameter whose name holds one of `also`."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(part in name for part in also):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def bert(path: Path, model_class=transformers.BertModel, *, layers: int = 2, perturb: bool = False, seed: int = 0):
    """A tiny random BERT of `model_class` (vocabulary 64, width 32, 4 heads), saved to `path`; returns it
    (in eval mode). perturb: non-trivial biases and norms (`perturbed`)."""
    torch.manual_seed(seed)
    model = model_class(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                                num_attention_heads=4, intermediate_size=48,
                                                max_position_embeddings=24)).eval()
    if perturb:
        perturbed(model, seed)
    model.save_pretrained(path)
    return model


def llama_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) with the tokenizer above, saved with save_pretrained."""
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def alpaca_file(path: Path, n: int) -> Path:
    words = WORDS
    rows = [{"instruction": f"{words[i % 7]} {words[(i * 3) % 11]}", "input": "",
             "output": " ".join(words[(i + j) % len(words)] for j in range(3 + i % 4))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def llava_parts(hf: dict, state: dict):
    """jaxft's parts of a transformers LLaVA (its config dict and numpy state dict): (tower Config, tower,
    projector Config, projector, language-model Config, language model), each read by its own name table."""
    import jax

    from jaxft import tree
    from jaxft.models import connectors, llama, tables, vit
    from jaxft.models.config import LlamaConfig

    tower_cfg = vit.Config.from_hf(hf["vision_config"])
    tower = vit.from_state_dict(tower_cfg, state, prefix="model.vision_tower.")
    proj_cfg = connectors.LlavaProjector.from_hf(hf)
    proj = connectors.from_state_dict(proj_cfg, state)
    lm_cfg = LlamaConfig.from_hf(hf["text_config"])
    lm_state = {k.replace("model.language_model.", "model."): v for k, v in state.items()
                if k.startswith(("model.language_model.", "lm_head."))}
    shapes = {p: x.shape for p, x in tree.items(jax.eval_shape(lambda: llama.init(jax.random.PRNGKey(0), lm_cfg)))}
    return tower_cfg, tower, proj_cfg, proj, lm_cfg, tables.from_state_dict(llama.TABLE, shapes, lm_state,
                                                                            what="llama")


def on_simulated_devices(script: str, out: Path, devices: int = 8) -> dict:
    """Runs `script` (a test file's own __main__, writing JSON to `out`) in a subprocess with `devices` simulated
    CPU devices, so that the rest of the suite keeps its single device; returns what it wrote. Optimization level
    0: the same computation compiled in half the time (these tests are about layouts and numbers, not speed)."""
    import os
    import subprocess
    import sys

    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, script, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(Path(out).read_text())


def hashes(*roots) -> dict:
    """{path: sha256} of every file under `roots` (files or directories): that a failed command left them alone."""
    files = [p for r in roots for p in ([Path(r)] if Path(r).is_file() else sorted(Path(r).rglob("*")))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}
