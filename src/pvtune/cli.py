"""The ``pvtune`` command line. Only this module parses arguments; it builds typed configs
and calls the library.

    pvtune reprs                      # every representation on one random layer
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("pvtune")


def _cmd_reprs(args: argparse.Namespace) -> int:
    from pvtune.demo import representation_table
    from pvtune.report import format_table

    rows = representation_table(args.out_features, args.in_features, seed=args.seed)
    print(f"Random Gaussian layer {args.out_features}x{args.in_features}:")
    print(format_table(
        ["representation", "config", "SQNR dB", "bits/param", "seconds"],
        [[r["representation"], r["config"], f"{r['sqnr_db']:.2f}", f"{r['bits_per_param']:.4f}",
          f"{r['seconds']:.2f}"] for r in rows],
    ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="pvtune",
        description="Train models through discrete parameters: compress LLMs to 1-4 bits "
                    "and fine-tune them with PV-Tuning or straight-through estimators.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("reprs", help="compare every weight representation on a random layer")
    p.add_argument("--out-features", type=int, default=512)
    p.add_argument("--in-features", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_reprs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pvtune`` script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Library errors carry user-facing messages; a traceback would only hide them.
        log.debug("error details", exc_info=True)
        print(f"pvtune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
