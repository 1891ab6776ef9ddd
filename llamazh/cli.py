"""The ``llamazh`` command line: a registry of subcommands, each a small function.

Modules add commands with :func:`command`; :data:`COMMAND_MODULES` lists the modules that
``main`` imports (lazily, so ``llamazh --help`` stays fast)::

    @command("merge-tokenizer", help="merge an extra SentencePiece model into a base one")
    def _merge(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
        parser.add_argument("BASE")
        return lambda args: ...  # the handler; returns the exit status
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Modules whose import registers subcommands.
COMMAND_MODULES: list[str] = [
    "llamazh.tokenizer.commands",
    "llamazh.training.commands",
    "llamazh.training.train",
    "llamazh.deploy.commands",
]

#: What ``llamazh --help`` says first (the module docstring is for developers).
DESCRIPTION = (
    "llamazh: adapt LLaMA-family models to Chinese: extend the tokenizer, train and merge "
    "adapters, export for llama.cpp. Run 'llamazh COMMAND --help' for each command's options."
)

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    build: Callable[[argparse.ArgumentParser], Handler]


_COMMANDS: dict[str, Command] = {}

# Errors a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)


def command(
    name: str, *, help: str
) -> Callable[[Callable[[argparse.ArgumentParser], Handler]], Callable]:
    """Register a subcommand: the decorated function adds arguments and returns the handler."""

    def register(build: Callable[[argparse.ArgumentParser], Handler]) -> Callable:
        if name in _COMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        _COMMANDS[name] = Command(name, help, build)
        return build

    return register


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from llamazh import __version__

    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="llamazh", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"llamazh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in _COMMANDS.values():
        sp = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sp.set_defaults(_handler=cmd.build(sp), _parser=sp)
    return parser


def add_text_option(parser: argparse.ArgumentParser, help: str, *, required: bool = True) -> None:
    """``--text FILE [FILE ...]``, repeatable: every command takes text files the same way.

    Example:
        >>> add_text_option(parser, "UTF-8 text files, one text per line")
        >>> parser.parse_args(["--text", "a.txt", "b.txt", "--text", "c.txt"]).text
        ['a.txt', 'b.txt', 'c.txt']
    """
    parser.add_argument(
        "--text",
        action="extend",
        nargs="+",
        required=required,
        metavar="FILE",
        help=f"{help} (several after one --text, or --text repeated)",
    )


def progress(message: str) -> None:
    """One line of progress on stderr (stdout stays the result)."""
    print(f"llamazh: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``llamazh`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    User errors (bad files, existing outputs, invalid values) print one line to stderr and
    return 2; nothing half-written is left behind by the commands.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._handler(args) or 0)
    except USER_ERRORS as exc:
        print(f"llamazh {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
