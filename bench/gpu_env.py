"""The machine a GPU check ran on: GPU, driver, library versions, and whether CuPy and torch share the
device. Writes one JSON object to --out and prints it.

    PYTHONPATH=.:kernels python3 bench/gpu_env.py --out runs/gpu/env.json
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import subprocess

PACKAGES = ("torch", "cupy-cuda13x", "cupy-cuda12x", "numpy", "transformers", "highspy", "pytest", "hypothesis")


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _nvidia_smi() -> list[str]:
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"unavailable: {exc!r}"]
    return run.stdout.strip().splitlines() or [run.stderr.strip()]


def _cuda() -> dict:
    import torch

    info: dict = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if not info["available"]:
        return info
    props = torch.cuda.get_device_properties(0)
    info |= {"device": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
             "capability": f"{props.major}.{props.minor}"}
    try:
        import cupy

        info["cupy_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cupy_driver"] = cupy.cuda.runtime.driverGetVersion()
        x = torch.arange(1 << 20, device="cuda")  # one int64 buffer seen by both: exact sums
        info["cupy_sees_torch_memory"] = int(cupy.asarray(x).sum()) == int(x.sum()) == (1 << 20) * ((1 << 20) - 1) // 2
    except Exception as exc:  # reported, not raised: the other stages say what it breaks
        info["cupy_error"] = repr(exc)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    env = {"python": platform.python_version(), "machine": platform.machine(), "versions": _versions(),
           "nvidia_smi": _nvidia_smi(), "cuda": _cuda()}
    with open(args.out, "w") as f:
        json.dump(env, f, indent=1)
    print(json.dumps(env, indent=1))


if __name__ == "__main__":
    main()
