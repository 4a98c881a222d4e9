"""The `jaxft` command line: `jaxft COMMAND [options]`, one command per module of `jaxft.commands`.

Each module in COMMANDS defines `register(subparsers)`, which adds its parser and sets `run(args) -> int` as
its handler. Heavy imports (JAX, transformers) happen inside the handlers, so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxft.commands import CommandError

# modules of jaxft/commands/, in the order `jaxft --help` lists them
COMMANDS = ("train", "eval", "demo", "generate", "export", "upcycle", "plot", "runs")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit code 2) rather than the usage text followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="jaxft", description="Fine-tune pretrained language models with JAX, and use them.")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"jaxft.commands.{name}").register(commands)
    args, extra = parser.parse_known_args(argv)
    # `--config.KEY=VALUE` overrides a config field (train, demo, ...); anything else unknown is an error.
    overrides = [a for a in extra if a.startswith("--config.") and "=" in a]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not getattr(args, "overrides_allowed", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = [a.removeprefix("--config.") for a in overrides]
    _cache_compilations()
    try:
        return args.run(args)
    except CommandError as e:
        print(f"jaxft {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _cache_compilations() -> None:
    """Keeps compiled programs in the jaxft cache, so that running a command again skips most compilation."""
    import jax

    from jaxft.hub import cache_dir

    if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR, if set, wins
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


if __name__ == "__main__":
    sys.exit(main())
