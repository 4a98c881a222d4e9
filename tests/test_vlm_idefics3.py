"""Idefics3 / SmolVLM with images through transformers' own processor, on a tiny random
Idefics3ForConditionalGeneration directory (SigLIP-like tower, pixel-shuffle connector, a tokenizer with
Idefics3's image tokens, an Idefics3 image processor that tiles): a prompt's ids and pixels equal
`Idefics3Processor`'s with one and two images (each marker expanded to the image's tiles), logits equal
transformers' (1e-4) and greedy generation is token-equal; training records tokenize as the processor makes them,
and `jaxft.train` trains on them with a step-0 evaluation loss equal to transformers' loss on the same tokens."""

import copy
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import tiny
from jaxft import checkpoint, config as config_lib, vlm_task
from jaxft.data import images, vlm
from jaxft.generate import generate
from jaxft.train.loop import train

from test_vlm_train import CONFIG

TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
SPECIAL = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
           *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics3")
    tok = tiny.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    cfg = transformers.Idefics3Config(vision_config=dict(TOWER), text_config=text.to_dict(), scale_factor=2,
                                      image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = transformers.Idefics3ForConditionalGeneration(cfg)
    with torch.no_grad():  # logits spread apart (no greedy near-ties), images that weigh on the answer
        model.lm_head.weight.mul_(30.0)
        model.model.connector.modality_projection.proj.weight.mul_(30.0)
    tiny.perturbed(model, 1, also=("norm",))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    proc = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    settings = dict(proc.to_dict(), image_processor_type="Idefics3ImageProcessor")
    (root / "model" / "preprocessor_config.json").write_text(json.dumps(settings))
    rs = np.random.RandomState(0)
    files = []
    for k, (h, w) in enumerate([(40, 52), (61, 45), (20, 24)]):  # each resized to 64 x 64: 2 x 2 tiles + whole
        files.append(root / f"{k}.png")
        Image.fromarray((255 * rs.rand(h, w, 3)).astype(np.uint8)).save(files[-1])
    processor = transformers.Idefics3Processor(image_processor=proc, tokenizer=copy.deepcopy(tok), image_seq_len=4)
    return root, model.eval(), processor, files


def _inputs(processor, text, files):
    return processor(text=text, images=[[Image.open(f).convert("RGB") for f in files]], return_tensors="pt")


def _real_tiles(inputs):
    """The processor's (1, N, C, H, W) pixels less its padding tiles: (n, C, H, W), as jaxft takes them."""
    pixels = inputs["pixel_values"][0].numpy()
    return pixels[inputs["pixel_attention_mask"][0].numpy().reshape(len(pixels), -1).any(-1)]


@pytest.mark.parametrize("prompt,n", [("<image> the quick brown fox", 1), ("a lazy <image> dog and <image> owls", 2)])
def test_prompt_logits_and_generation_equal_transformers(setup, prompt, n):
    root, model, processor, files = setup
    loaded = checkpoint.load(root / "model")
    cfg = loaded.cfg
    assert (cfg.model_type, cfg.image_tokens) == ("idefics3", 4)
    ids, pixels = vlm.image_prompt(root / "model", cfg, loaded.tokenizer, prompt, files[:n])
    inputs = _inputs(processor, prompt, files[:n])
    assert ids == inputs["input_ids"][0].tolist()
    np.testing.assert_array_equal(pixels, _real_tiles(inputs))
    assert len(pixels) == 5 * n  # 2 x 2 tiles + the whole image, each

    from jaxft.models import family_of
    ours = family_of(cfg).forward(cfg, loaded.params, np.array([ids]), pixel_values=pixels)[0]
    with torch.no_grad():
        theirs = model(**inputs).logits
        want = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=0)
    got = generate(cfg, loaded.params, [ids], max_new_tokens=STEPS, extras={"pixel_values": pixels})[0]
    assert got == want[0, len(ids):].tolist()
    assert generate(cfg, loaded.params, [ids], max_new_tokens=STEPS, extras={"pixel_values": -3 * pixels})[0] != got


def test_training_records_tokenize_as_the_processor(setup, tmp_path):
    """A messages record with two images and a LLaVA record: the token ids equal what
    Idefics3Processor makes of the chat-rendered conversation; the loss is on the assistant's tokens only; a batch
    holds each image's tiles in order."""
    root, _, processor, files = setup
    data = tmp_path / "train.json"
    data.write_text(json.dumps([
        {"images": [str(files[0]), str(files[2])], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
            {"role": "assistant", "content": "the quick fox"}]},
        {"image": str(files[1]), "conversations": [{"from": "human", "value": "<image>\nseven owls"},
                                                   {"from": "gpt", "value": "a lazy dog"}]}]))
    tok = transformers.AutoTokenizer.from_pretrained(root / "model")
    hf = json.loads((root / "model" / "config.json").read_text())
    proc = images.image_processor(json.loads((root / "model" / "preprocessor_config.json").read_text()))
    records = vlm.read_vlm(data)
    vex = vlm.tokenize_vlm(records, tok, 256, vlm.image_expansion(hf, tok, proc))
    assert vex.tiles == [5 + 5, 5]
    for e, (r, paths) in enumerate(zip(records, [files[0::2], files[1:2]])):
        text = tok.apply_chat_template(r.messages, tokenize=False)
        want = _inputs(processor, text, paths)["input_ids"][0].tolist()
        a, z = vex.examples.starts[e], vex.examples.starts[e + 1]
        assert vex.examples.ids[a:z].tolist() == want + [tok.eos_token_id]  # (jaxft ends an example with EOS)
        counted = tok.decode(vex.examples.ids[a:z][vex.examples.loss[a:z]])
        assert counted == r.messages[-1]["content"] + "<|im_end|>\n<|endoftext|>"
    from jaxft.data import vlm_batches
    batch = vlm_batches.build_batch(vex, [np.array([0]), np.array([1])], 256, 16, proc)
    want = np.concatenate([_real_tiles(_inputs(processor, "<image><image>", files[0::2])),
                           _real_tiles(_inputs(processor, "<image>", files[1:2]))])
    np.testing.assert_array_equal(batch["pixel_values"][:15], want)
    assert batch["image_mask"].tolist() == [True] * 15 + [False]
    # without image splitting: each image is one tile, `<global-img>` alone (rows = cols = 0)
    whole = dict(json.loads((root / "model" / "preprocessor_config.json").read_text()), do_image_splitting=False)
    proc = images.image_processor(whole)
    vex = vlm.tokenize_vlm(records, tok, 256, vlm.image_expansion(hf, tok, proc))
    assert vex.tiles == [2, 1]
    reference = transformers.Idefics3Processor(image_processor=proc, tokenizer=copy.deepcopy(tok), image_seq_len=4)
    text = tok.apply_chat_template(records[0].messages, tokenize=False)
    want = _inputs(reference, text, files[0::2])["input_ids"][0].tolist()
    assert vex.examples.ids[:vex.examples.starts[1]].tolist() == want + [tok.eos_token_id]


def test_trainer_on_idefics3(setup, tmp_path):
    """`jaxft.train` on an Idefics3 model with images (LoRA, the connector trained in full): the step-0 evaluation
    loss equals transformers' loss over the same held-out conversations (processor's ids, the assistant's tokens),
    and 4 steps lower it."""
    root, model, processor, _ = setup
    train_file, eval_file = vlm_task.generate(tmp_path / "data", 12, seed=0, n_eval=4)
    config = config_lib.load(CONFIG, [f"model={root / 'model'}", f"data.train={train_file}",
                                      f"data.eval={eval_file}", "dtype=float32", "param_dtype=float32",
                                      "train.batch_size=4", "train.seq_len=128", "train.steps=4", "train.eval_every=4",
                                      "train.save_every=4", "train.learning_rate=1e-2", "train.warmup_steps=0",
                                      "lora.rank=4", "lora.dropout=0.0", "data.pack=false"])
    summary = train(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert summary["status"] == "completed" and len(evals) == 2 and evals[1] < evals[0]

    tok = processor.tokenizer
    total, count = 0.0, 0
    for r in vlm.read_vlm(eval_file):
        text = tok.apply_chat_template(r.messages, tokenize=False)
        inputs = _inputs(processor, text, r.images)
        # jaxft's example: the processor's ids + EOS, the loss on the answer, <|im_end|>, "\n" and EOS
        ids = torch.cat([inputs["input_ids"][0], torch.tensor([tok.eos_token_id])])
        inputs["input_ids"], inputs["attention_mask"] = ids[None], torch.ones(1, len(ids), dtype=torch.long)
        answer = tok(r.messages[-1]["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"] + [1]
        start = len(ids) - len(answer)
        assert ids[start:].tolist() == answer and tok.eos_token_id == 1
        with torch.no_grad():
            logp = torch.log_softmax(model(**inputs).logits[0].double(), -1)
        targets = torch.arange(start, len(ids))
        total -= float(logp[targets - 1, ids[targets]].sum())
        count += len(targets)
    np.testing.assert_allclose(evals[0], total / count, rtol=1e-4)
