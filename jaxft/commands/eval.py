"""`jaxft eval`: the metrics of a trained run (or of the model it starts from) on the config's evaluation data."""

from __future__ import annotations

import argparse

from jaxft.commands import CommandError

HELP = """Evaluate the run in WORKDIR with the metrics of the config's task, on its evaluation data (data.eval, or
the part of data.train that training held out), and write them to WORKDIR/eval.json ({metric: value}).

The weights are WORKDIR/adapter (the adapter and the task's head, as `jaxft train` saved them). A WORKDIR with
no adapter evaluates the base model (or peft.init_from) with a freshly initialized head: the run's step 0.
Override any config field with --config.KEY=VALUE, e.g. --config.data.eval=test.tsv --config.eval.batch_size=64.

metrics by task: causal_lm loss, perplexity; classification loss, accuracy, macro precision / recall / f1;
token_classification loss, entity_precision / entity_recall / entity_f1 (seqeval), token_accuracy;
embedding loss, retrieval_accuracy (spearman with data.score_field); mlm loss, perplexity, masked accuracy;
seq2seq loss, perplexity and ROUGE or BLEU / chrF of generated targets; peft.method=features (a head over the
frozen model's pooled features) eval_loss, accuracy, macro precision / recall / f1, on the texts training held
out (needs the trained head)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run with its task's metrics (into WORKDIR/eval.json)",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE",
                   help="the run's config file, e.g. configs/minilm_sst2_lora.py")
    p.add_argument("--workdir", required=True, metavar="DIR", help="the run's workdir (its adapter/ is evaluated)")
    p.set_defaults(run=run, overrides_allowed=True)


def run(args) -> int:
    from jaxft import config as config_lib
    from jaxft.checkpoint import LoadError
    from jaxft.data import DataError
    from jaxft.train.evaluate import evaluate, table

    try:
        config = config_lib.load(args.config, args.overrides)
        config_lib.validate(config, require_data=False)  # data.eval alone is enough to evaluate on
        results, source = evaluate(config, args.workdir)
    except (config_lib.ConfigFileError, DataError, LoadError, ValueError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
    print(f"{source}:")
    print(table(results))
    return 0
