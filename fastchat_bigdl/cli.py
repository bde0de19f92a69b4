"""The ``fastchat-bigdl`` command: ``serve``, ``bench`` and ``doctor``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from fastchat_bigdl import __version__


def build_parser() -> argparse.ArgumentParser:
    from fastchat_bigdl.bench import main as bench
    from fastchat_bigdl.stack import doctor, serve

    parser = argparse.ArgumentParser(prog="fastchat-bigdl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastchat-bigdl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve", help="Start controller, low-bit worker and OpenAI API server on loopback"
    )
    serve.add_serve_args(serve_parser)
    serve_parser.set_defaults(run=serve.run)
    bench_parser = commands.add_parser(
        "bench", help="Benchmark the low-bit worker against FastChat's stock worker on the same model"
    )
    bench.add_bench_args(bench_parser)
    bench_parser.set_defaults(run=bench.main_args)
    doctor_parser = commands.add_parser("doctor", help="Check versions, devices, proxy settings and a running stack")
    doctor.add_doctor_args(doctor_parser)
    doctor_parser.set_defaults(run=doctor.main_args)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from fastchat_bigdl.common.netenv import bypass_proxy_for_loopback

    bypass_proxy_for_loopback()  # before any HTTP client exists: no proxy sees loopback traffic
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
