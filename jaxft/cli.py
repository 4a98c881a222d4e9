"""The `jaxft` command line: `jaxft COMMAND [options]`, one command per module of `jaxft.commands`.

Each module in COMMANDS defines `register(subparsers)`, which adds its parser and sets `run(args) -> int` as
its handler. Heavy imports (JAX, transformers) happen inside the handlers, so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import sys

from jaxft.commands import CommandError

# modules of jaxft/commands/, in the order `jaxft --help` lists them
COMMANDS = ("train", "eval", "demo", "generate", "export", "upcycle", "plot", "runs", "aot")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit code 2) rather than the usage text followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="jaxft", description="Fine-tune pretrained language models with JAX, and use them.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
    # jaxft's progress (the settings in force, data, evaluations) on stderr; other libraries' warnings only
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("jaxft").setLevel(logging.INFO)
    _cache_compilations()
    try:
        return args.run(args)
    except CommandError as e:
        print(f"jaxft {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def version() -> str:
    """The installed package's version (pyproject.toml); 'unknown' when jaxft runs from a source tree that was
    never installed."""
    try:
        return importlib.metadata.version("jaxft")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cache_compilations() -> None:
    """Keeps compiled programs in the jaxft cache, so that running a command again skips most compilation.
    Through the environment while JAX is not imported yet: importing it takes seconds, and a command refusing
    a bad value should not wait for that."""
    from jaxft.hub import cache_dir

    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))  # one the user set wins
        return
    import jax

    if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR, if set, wins
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


if __name__ == "__main__":
    sys.exit(main())
