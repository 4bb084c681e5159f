"""The `orbitflow` command.

    orbitflow generate --prompt "What is the capital of France?" --chat --max-tokens 32
    orbitflow generate --model tiny-llama --prompt-ids 1,2,3 --kv-policy all-offload
    orbitflow demo          # a few long prompts under each KV policy, with TTFT/TPOT per request
    orbitflow policies      # list KV placement policies
    orbitflow dashboard push --grafana-url http://grafana:3000 --api-key KEY   # Grafana dashboard
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from orbitflow_ray.config import EngineConfig

_INT_FIELDS_AS_BYTES = {"device_kv_bytes", "host_kv_bytes", "staging_kv_bytes"}


def parse_bytes(text: str) -> int:
    """'64MiB', '1G', '1048576' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return t in ("true", "1", "yes", "on")


def parse_int_list(text: str) -> tuple[int, ...]:
    """'32,64,128' -> (32, 64, 128)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


_CONVERTERS = {bool: parse_bool}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, its help taken from the field's metadata."""
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        conv = parse_bytes if f.name in _INT_FIELDS_AS_BYTES else _CONVERTERS.get(kind, kind)
        if typing.get_origin(kind) is tuple:
            conv = parse_int_list
        default = None if f.name in _INT_FIELDS_AS_BYTES or f.default is None else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), type=conv, default=default,
                            help=f.metadata.get("help", "") + (f" (default: {f.default})" if f.default is not None else ""))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


def cmd_generate(args: argparse.Namespace) -> int:
    from orbitflow_ray import SamplingParams
    from orbitflow_ray.llm import LLM

    llm = LLM(**dataclasses.asdict(engine_config(args)))
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.sampling_seed, stop=args.stop or [])
    if args.prompt_ids:
        outs = llm.generate([[int(t) for t in args.prompt_ids.split(",")]], sp)
    elif args.chat:
        outs = llm.chat([{"role": "user", "content": args.prompt}], sp)
    else:
        outs = llm.generate([args.prompt], sp)
    for o in outs:
        print(o.text if llm.tokenizer is not None else o.token_ids)
        m = o.metrics
        tpot = f"{m.tpot * 1e3:.1f} ms" if m.tpot is not None else "n/a"
        print(f"[{len(o.token_ids)} tokens, finish={o.finish_reason}, TTFT {m.ttft * 1e3:.1f} ms, TPOT {tpot}]",
              file=sys.stderr)
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from orbitflow_ray.planner import available_policies, describe_policy

    for name in available_policies():
        print(f"{name:22s} {describe_policy(name)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from orbitflow_ray.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orbitflow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt with the offline engine")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids (for models without a tokenizer)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 disables (default: 0)")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    d = sub.add_parser("demo", help="run long prompts through every KV policy and print TTFT/TPOT")
    d.add_argument("--model", default="smollm2-135m", help="model (default: smollm2-135m)")
    d.add_argument("--num-prompts", type=int, default=4, help="requests per policy (default: 4)")
    d.add_argument("--prompt-tokens", type=int, default=1500, help="approximate prompt length (default: 1500)")
    d.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    d.set_defaults(func=cmd_demo)
    from orbitflow_ray.sim.cli import add_sim_commands

    add_sim_commands(sub)
    from orbitflow_ray.dashboard import add_dashboard_commands

    add_dashboard_commands(sub)
    from orbitflow_ray.serving.cli import add_serve_command

    add_serve_command(sub)
    pol = sub.add_parser("policies", help="list KV placement policies")
    pol.set_defaults(func=cmd_policies)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"orbitflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
