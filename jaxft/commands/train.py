"""`jaxft train`: fine-tune a model as a config file describes, into a workdir."""

from __future__ import annotations

import argparse
import sys
import textwrap

from jaxft.commands import CommandError

HELP = """Fine-tune a model as CONFIG describes, writing checkpoints, metrics and the adapter into WORKDIR.

Override any config field with --config.KEY=VALUE, e.g. --config.lora.rank=32 --config.train.steps=500
--config.data.train=data.jsonl. A key that does not exist is an error, and every value is checked before
anything loads. The learning rate, unless CONFIG or an override sets it, is the method's default
(jaxft/config/defaults.py); the run's first log lines say which values are in force and where each comes
from. WORKDIR afterwards holds config.json (the run's settings, written once), metrics.jsonl, tensorboard/,
checkpoints/, adapter/, plots/ and summary.json. A workdir that holds a run is never overwritten: pass --resume
to continue that run (from its last complete checkpoint; config_history.jsonl records what the resume changed),
or --overwrite to move it aside to WORKDIR.replaced-TIME and start afresh. Ctrl-C (or SIGTERM) saves a
checkpoint after the current step; a second Ctrl-C quits at once. The run stops with an error if the loss or
the parameters stop being finite, or if it collapses (see guard.* in the config)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model from a config file",
                              description=HELP, epilog=config_groups(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="a config file, e.g. configs/default_lora.py")
    p.add_argument("--workdir", required=True, metavar="DIR", help="where checkpoints, metrics and the adapter go")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoints are in WORKDIR")
    p.add_argument("--overwrite", action="store_true",
                   help="move a run already in WORKDIR aside (WORKDIR.replaced-TIME) and start afresh")
    hosts = p.add_argument_group("several hosts (automatic on Cloud TPU VMs and in SLURM jobs; else all three)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, e.g. 10.0.0.2:8476")
    hosts.add_argument("--num-processes", type=int, metavar="N", help="number of processes (one per host)")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    p.set_defaults(run=run, overrides_allowed=True)


def config_groups() -> str:
    """The help text's list of config groups and their keys, from the base config (so it cannot go stale)."""
    from jaxft import config as config_lib

    groups = {"(top level)": []}
    for name, value in config_lib.base.get_config().items():
        if hasattr(value, "keys"):
            groups[name] = list(value.keys())
        else:
            groups["(top level)"].append(name)
    lines = [f"config groups and their keys (each key's default and meaning: {config_lib.BASE_FILE};",
             "the learning rate of each method: jaxft/config/defaults.py):"]
    for name, keys in groups.items():
        lines += textwrap.wrap(", ".join(keys), 116, initial_indent=f"  {name:<12}", subsequent_indent=" " * 14)
    return "\n".join(lines)


def run(args) -> int:
    from jaxft import config as config_lib

    try:  # before JAX is imported: a wrong value is one line within a second
        config = config_lib.load(args.config, args.overrides)
        config_lib.validate(config)
    except config_lib.ConfigFileError as e:
        raise CommandError(str(e)) from None
    from jaxft import parallel
    from jaxft.data import DataError
    from jaxft.train.checkpoints import ResumeError
    from jaxft.train.loop import TrainingError, train

    try:
        parallel.initialize(args.coordinator, args.num_processes, args.process_id)  # before any other JAX use
        summary = train(config, args.workdir, resume=args.resume, overwrite=args.overwrite)
    except (config_lib.ConfigFileError, DataError, ResumeError, TrainingError, ValueError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
    except OSError as e:  # a read-only or full workdir, or a file that vanished: say which, not the stack
        raise CommandError(f"{e.filename or args.workdir}: {e.strerror or e}") from None
    print(f"{summary['status']} at step {summary['step']}; eval loss {summary['eval_loss']}; "
          f"adapter: {summary['adapter']}")
    if summary["status"] == "interrupted":
        print(f"a checkpoint is saved: continue with --resume --workdir {args.workdir}", file=sys.stderr)
        return 130
    return 0
