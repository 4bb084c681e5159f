"""Load-test an OpenAI-compatible endpoint with an open-loop trace; write report.json, report.md
and PNG plots (the simulator's format).

Examples:
  # start the app from its Serve config on a local Ray, 60 s of Poisson arrivals, then shut it down
  python -m load_tests --config deployments/config.yaml --rate 0.5 --duration 60 --out reports/x

  # long contexts that force KV offloading, with the simulator's prediction side by side
  python -m load_tests --workload longbench --min-input-tokens 1100 --max-input-tokens 1600 \\
      --min-output-tokens 32 --max-output-tokens 64 --rate 0.2 --duration 60 --compare-sim

  # every KV policy on the same trace (the app is redeployed for each): one side-by-side report
  python -m load_tests --policies orbitflow,all-offload,no-offload --rate 0.3 --duration 60

  # a server that is already up (ours or vLLM); a recorded JSONL trace; at most 8 requests in flight
  python -m load_tests --url http://localhost:8000 --model meta-llama/Llama-3.1-8B-Instruct \\
      --trace trace.jsonl --max-concurrency 8 --no-slo-field

Times: a request's latencies run from when it is sent; a request held back by --max-concurrency
records that wait apart (client-side wait). Failed requests (HTTP errors, refused connections,
timeouts, errors mid-stream) are reported with their errors, never dropped.
"""

from __future__ import annotations

import argparse
import sys


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load_tests", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--config", help="Serve config of the app. Without --url the harness starts it on a local Ray "
                                    "and shuts it down at the end; with --url it only reads the engine settings "
                                    "(for --compare-sim and default SLOs). Default: deployments/config.yaml "
                                    "when --url is not given")
    t.add_argument("--url", help="base URL of an OpenAI-compatible server already running, e.g. "
                                 "http://localhost:8000 (default: none; start the app from --config)")
    t.add_argument("--port", type=int, default=None,
                   help="HTTP port of the app the harness starts; 0 picks a free one (default: the config's "
                        "http_options.port)")
    t.add_argument("--model", help="model name sent in requests (default: the config's served name, else the "
                                   "first model the server lists)")
    t.add_argument("--api-key", help="bearer token for the server (default: $OPENAI_API_KEY if set, else none)")
    t.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="API to call: /v1/completions keeps prompt lengths exact; chat adds the template's "
                        "tokens (default: completions)")
    t.add_argument("--policies", type=_names, default=None,
                   help="comma-separated KV policies, each optionally +fcfs or +slo for that admission instead "
                        "of its own (no-offload+slo): redeploy the app with each in turn (args.engine.kv_policy, "
                        "args.engine.admission) and report them side by side; needs a managed app (default: the "
                        "config's policy only)")
    t.add_argument("--tokenizer", help="tokenizer for sizing prompts (default: the app's model, else --model); "
                                       "if this machine lacks it, lengths are approximate (one word a token)")
    w = p.add_argument_group("workload (orbitflow_ray.sim.workload)")
    w.add_argument("--trace", help="a JSONL trace (arrival_s, input_tokens, output_tokens[, tpot_slo_s, "
                                   "ttft_slo_s]) instead of a generated one (default: generate)")
    w.add_argument("--workload", default="sharegpt",
                   help="length distribution: sharegpt, longbench, fixed or uniform (default: sharegpt)")
    w.add_argument("--arrival", default="poisson", help="arrival process: poisson, gamma or lognormal "
                                                         "(default: poisson)")
    w.add_argument("--rate", type=_positive(float), default=1.0, help="mean arrival rate, requests/s (default: 1)")
    w.add_argument("--cv", type=_positive(float), default=1.0,
                   help="coefficient of variation of the arrival gaps, gamma/lognormal (default: 1)")
    w.add_argument("--duration", type=_positive(float), default=None,
                   help="seconds of reported arrivals, after the warm-up (default: 60 for a generated trace; "
                        "a --trace is used whole)")
    w.add_argument("--num-requests", type=int, default=None,
                   help="instead of --duration: this many requests in all, warm-up included (default: unset)")
    w.add_argument("--warmup", type=float, default=0.0,
                   help="seconds of arrivals at the start that are sent but left out of the report (default: 0)")
    for name, what in (("input-tokens", "fixed: every prompt's length; sharegpt: the mean"),
                       ("output-tokens", "fixed: every output's length; sharegpt: the mean"),
                       ("min-input-tokens", "prompt floor"),
                       ("max-input-tokens", "prompt cap (default: the distribution's, lowered to fit the "
                                            "model's context when known)"),
                       ("min-output-tokens", "output floor"), ("max-output-tokens", "output cap")):
        w.add_argument(f"--{name}", type=int, default=None,
                       help=what + ("" if "default:" in what else " (default: the distribution's)"))
    w.add_argument("--seed", type=int, default=0, help="trace and prompt seed (default: 0)")
    w.add_argument("--tpot-slo", type=_positive(float), default=None,
                   help="TPOT/TBT SLO in seconds for requests whose trace sets none; sent in the `slo` field "
                        "(default: none sent; judged against the app's engine.tpot_slo_s, else 0.25)")
    w.add_argument("--ttft-slo", type=_positive(float), default=None,
                   help="TTFT SLO in seconds, likewise (default: none sent; judged against the app's "
                        "default_ttft_slo_s, else 10). Goodput counts requests meeting TTFT, TPOT and TBT")
    c = p.add_argument_group("client")
    c.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight; later ones wait client-side (default: no cap)")
    c.add_argument("--timeout", type=_positive(float), default=600.0,
                   help="per-request timeout in seconds, from sending; a timed-out request is failed (default: 600)")
    c.add_argument("--no-slo-field", action="store_true",
                   help="do not send the `slo` extension field (for servers that reject unknown fields)")
    s = p.add_argument_group("simulator")
    s.add_argument("--compare-sim", action="store_true",
                   help="replay the same trace in the simulator with the app's engine config and report "
                        "predicted vs measured (default: off)")
    s.add_argument("--sim-gpu", default="cpu-2core",
                   help="GPU spec for --compare-sim: a name from sim/specs/gpus.yaml or a calibrated .yaml "
                        "(default: cpu-2core, this machine)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="reports/loadtest",
                   help="directory for report.json, report.md, requests.jsonl and plots (default: reports/loadtest)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar (default: show one)")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.num_requests is not None and opts.num_requests < 1:
        raise SystemExit("--num-requests must be >= 1")
    if opts.max_concurrency is not None and opts.max_concurrency < 1:
        raise SystemExit("--max-concurrency must be >= 1")
    if opts.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    from load_tests.run import run_load_test

    run_load_test(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
