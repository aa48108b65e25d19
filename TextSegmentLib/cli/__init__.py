"""``textsegment`` command line: a thin adapter over the library.

Each sub-command lives in its own module exposing ``register(subparsers)``; it translates
arguments, shows progress and calls the library. Any ``TextSegmentError`` becomes one line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import sys
from typing import Optional, Sequence

from .. import __version__
from ..errors import TextSegmentError

COMMANDS = ("batch", "bench", "demo", "explain", "info", "phantom", "reproduce", "segment", "train", "weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textsegment",
        description="Text-prompted CT segmentation with layer-wise saliency. Research use only; not for diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"textsegment {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}{_prompt_hint(args, extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TextSegmentError as exc:
        print(f"textsegment {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # files finished before the interruption stay (a batch's earlier series, a training run's last.pt)
        hint = "; continue with --resume" if args.command == "train" else ""
        print(f"textsegment {args.command}: interrupted; files finished before the interruption were kept{hint}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `textsegment weights list | head`: the reader has gone, nothing more to say
        _drop_stdout()
        return 1


def _prompt_hint(args: argparse.Namespace, extra: Sequence[str]) -> str:
    """`-p liver spleen` or `-p left kidney`: words left over after a prompt are a prompt's words, not a typo."""
    if not getattr(args, "prompt", None) or any(word.startswith("-") for word in extra):
        return ""
    return (f"; each prompt needs its own --prompt/-p, and a prompt of several words needs quotes: "
            f"-p {args.prompt[-1]} -p {extra[0]}, or -p \"{args.prompt[-1]} {' '.join(extra)}\"")


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit does not print a second BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # not a real file (a test's capture)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
