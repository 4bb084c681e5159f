"""`orbitflow serve`: run the Ray Serve app from a config file (a thin wrapper of `serve run` that
also takes the API key from a flag without writing it into the config)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

DEFAULT_CONFIG = "deployments/config.yaml"


def add_serve_command(sub) -> None:
    s = sub.add_parser("serve", help="serve the OpenAI API with Ray Serve (wraps `serve run CONFIG`)",
                       description="Start local Ray (or join RAY_ADDRESS) and run the OrbitFlow app from a Serve "
                                   "config file; Ctrl-C stops it. Example: orbitflow serve --api-key $KEY")
    s.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"Serve config file (default: {DEFAULT_CONFIG}; deployments/config.gpu.yaml for a GPU cluster)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $ORBITFLOW_API_KEY if set, else open)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        raise ValueError(f"no Serve config at {args.config!r} (run from the repository root, or pass --config)")
    serve_bin = shutil.which("serve", path=str(Path(sys.executable).parent)) or shutil.which("serve")
    if serve_bin is None:
        raise ValueError("the `serve` command of ray[serve] is not installed in this environment")
    env = dict(os.environ)
    if args.api_key:
        env["ORBITFLOW_API_KEY"] = args.api_key  # replicas inherit the driver's environment on local Ray
    os.execve(serve_bin, [serve_bin, "run", args.config], env)
    return 0  # not reached
