"""Method-aware defaults: the values a key takes when the base config leaves it `None` and neither the config
file nor an override sets it, per `peft.method`.

A method that trains a few soft tokens or scaling vectors needs a much larger step than one that retrains the
whole model: at LoRA's 2e-4, prefix, prompt tuning and IA3 moved the held-out loss of 24 steps of instruction
tuning by 0.1-0.3%. The values follow the methods' papers and PEFT's guides, and are measured on the default
model by `bench/methods.py` (README, "Methods"):

  lora      2e-4  QLoRA (Dettmers et al. 2023) and PEFT's LoRA guides (1e-4 .. 1e-3)
  adapter   1e-3  Houlsby et al. 2019 searched 3e-5 .. 3e-3; AdapterHub's guides 1e-4 .. 1e-3
  prefix    1e-2  PEFT's prefix-tuning guide (Li and Liang 2021 use 5e-5 .. 8e-5 over many epochs)
  prompt    3e-2  PEFT's prompt-tuning guide (Lester et al. 2021: 0.3 with Adafactor)
  ia3       3e-3  T-Few (Liu et al. 2022) and PEFT's IA3 guide
  full      5e-5  full fine-tuning of small models (1e-5 .. 5e-5)
  partial   5e-4  a few top blocks retrained in full: fewer weights move than in full fine-tuning, so a larger
                  step (at 1e-4 the held-out loss fell 0.9% in the 24-step budget, full's 5.2% at 5e-5)
  features  1e-2  a linear head on fixed features (logistic regression)
"""

METHOD_DEFAULTS = {
    "lora": {"train.learning_rate": 2e-4},
    "adapter": {"train.learning_rate": 1e-3},
    "prefix": {"train.learning_rate": 1e-2},
    "prompt": {"train.learning_rate": 3e-2},
    "ia3": {"train.learning_rate": 3e-3},
    "full": {"train.learning_rate": 5e-5},
    "partial": {"train.learning_rate": 5e-4},
    "features": {"train.learning_rate": 1e-2},
}
