"""The `bcllm` command: argument parsing and thin handlers over the library calls."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
