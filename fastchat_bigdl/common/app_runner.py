"""Serve a FastChat app with uvicorn the way FastChat's own entry points do."""
from __future__ import annotations

import argparse
import os


def run_app(app, args: argparse.Namespace) -> None:
    import uvicorn

    ssl = {}
    if getattr(args, "ssl", False):
        ssl = {"ssl_keyfile": os.environ["SSL_KEYFILE"], "ssl_certfile": os.environ["SSL_CERTFILE"]}
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **ssl)
