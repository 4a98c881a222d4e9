"""`jaxft demo`: the main job. Fine-tunes the default model on a generated task and shows before/after."""

from __future__ import annotations

from pathlib import Path

from jaxft.commands import CommandError

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_dates.py"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="fine-tune the default model end to end on a generated task (a few minutes on a CPU)",
        description="Generates a date-rewriting task, measures the default model's exact match on held-out "
                    "dates, fine-tunes it with LoRA (configs/demo_dates.py), measures again and prints samples. "
                    "Accepts --config.KEY=VALUE overrides of that config.")
    p.add_argument("--workdir", default="runs/demo", metavar="DIR", help="where data, checkpoints and the adapter go")
    p.set_defaults(run=run, overrides_allowed=True)


def run(args) -> int:
    from jaxft import config as config_lib

    try:  # before the model loads; the demo writes its own data.train
        config_lib.validate(config_lib.load(DEMO_CONFIG, args.overrides), require_data=False)
    except config_lib.ConfigFileError as e:
        raise CommandError(str(e)) from None
    from jaxft import demo

    return demo.main(args.workdir, tuple(args.overrides))
