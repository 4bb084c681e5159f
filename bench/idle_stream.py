"""Idle-server stream rate: one 48-token request on `serve run deployments/config.yaml`, streamed and not.

    python bench/idle_stream.py                                # starts `serve run` on a free port (~2-4 min)
    python bench/idle_stream.py --url http://127.0.0.1:8000    # a server that is already up, and idle

Token-Deposit may hold a streamed token back only to cover a stall the plan predicts; on an idle
server there is none, so a stream should arrive at the rate the engine makes it. This sends one
warm-up completion, then the same 48-token greedy completion (ignore_eos) twice, one at a time:
non-streamed (the engine's rate: 48 tokens / request wall time) and streamed (48 tokens / request
wall time, and the rate between the first and last token as the client saw them). Prints both rates
and streamed / non-streamed. The server is started in a session of its own and everything in that
session is stopped at the end (never anyone else's Ray).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from load_tests.app import free_port  # noqa: E402

PROMPT = "The capital of France is"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a server already up (default: start `serve run CONFIG`)")
    ap.add_argument("--config", default="deployments/config.yaml")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--log", default=None, help="the server's output (default: a temporary file)")
    args = ap.parse_args()
    if args.url:
        report(args.url.rstrip("/"), args.tokens)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        doc = yaml.safe_load((ROOT / args.config).read_text())
        doc.setdefault("http_options", {})["port"] = port
        config = Path(tmp, "config.yaml")
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        log = Path(args.log or Path(tmp, "serve.log"))
        with serve_run(config, log) as proc:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(proc, base, log)
            report(base, args.tokens)
    return 0


def report(base: str, tokens: int) -> None:
    model = get(f"{base}/v1/models")["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    post(f"{base}/v1/completions", {**body, "max_tokens": 8})  # warm-up
    t0 = time.perf_counter()
    plain = post(f"{base}/v1/completions", body)
    plain_s = time.perf_counter() - t0
    n_plain = plain["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    times, n_stream = stream(f"{base}/v1/completions", {**body, "stream": True,
                                                        "stream_options": {"include_usage": True}})
    stream_s = time.perf_counter() - t0
    plain_rate, stream_rate = n_plain / plain_s, n_stream / stream_s
    between = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    print(f"non-streamed: {n_plain} tokens in {plain_s:.2f} s = {plain_rate:.1f} tokens/s")
    print(f"streamed:     {n_stream} tokens in {stream_s:.2f} s = {stream_rate:.1f} tokens/s "
          f"({len(times)} text chunks, {between:.1f} chunks/s from first to last)")
    print(f"streamed / non-streamed: {stream_rate / plain_rate:.2f}")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def stream(url: str, body: dict) -> tuple[list[float], int]:
    """Arrival time of every chunk that carries text, and the completion tokens the usage reports."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    times, tokens = [], 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if any(c.get("text") for c in chunk.get("choices") or []):
                times.append(time.perf_counter())
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return times, tokens


@contextlib.contextmanager
def serve_run(config: Path, log: Path):
    """`serve run CONFIG` from the repository root on a Ray of its own, in a session of its own;
    on exit, Ctrl-C, then whatever of that session is left is killed."""
    env = {**os.environ, "RAY_ADDRESS": "local"}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(config)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError):
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                pids.append(int(entry))
    return pids


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            if get(f"{base}/health").get("status") == "ok":
                return
        time.sleep(1.0)
    raise RuntimeError(f"no answer on {base}/health after {timeout_s:g} s")


if __name__ == "__main__":
    sys.exit(main())
