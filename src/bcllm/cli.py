"""The `bcllm` command line. Each subcommand is a `cmd_*` function; options shared
by several commands are added by the `add_*_args` helpers so they read the same
everywhere."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m, gemma3-270m), .gguf file, HF folder or cached HF id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--seed", type=int, default=0)


def add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=16, help="circulant block size b")
    p.add_argument("--layers", default="all", help="decoder layers: all, 10-19, 0,3,5")
    p.add_argument("--targets", default="mlp",
                   help="comma-separated module suffixes, globs, or shorthands mlp / attn")


def config_from_args(args):
    from .surgery import CirculantConfig

    return CirculantConfig(block_size=args.block_size, targets=args.targets, layers=args.layers)


def print_summary(summary: dict) -> None:
    print(f"replaced {summary['num_modules']} modules: {summary['replaced_params']:,} dense parameters -> "
          f"{summary['circulant_params']:,} ({summary['ratio']:.1f}x fewer); "
          f"model {summary['model_params_before']:,} -> {summary['model_params_after']:,}")


def cmd_compress(args) -> None:
    import time

    import torch

    from .models import load_model
    from .surgery import compress_

    torch.manual_seed(args.seed)
    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    t = time.perf_counter()
    summary = compress_(model, config_from_args(args))
    print_summary(summary)
    print(f"compress_ took {time.perf_counter() - t:.2f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcllm", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"bcllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model and print what was replaced")
    add_model_args(p)
    add_compress_args(p)
    p.set_defaults(func=cmd_compress)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as e:
        # Our own checks raise these with a message meant for the user; BCLLM_DEBUG=1 shows the traceback.
        if os.environ.get("BCLLM_DEBUG"):
            raise
        print(f"bcllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished results are on disk", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
