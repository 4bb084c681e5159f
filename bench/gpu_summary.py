"""Merge the parts a GPU check wrote (stage records, env, pytest's junit XML, benchmark JSON) into
one JSON file, and print a compact summary. Called by bench/gpu_check.sh after every stage, so the
JSON is current even if a later stage hangs.

    python3 bench/gpu_summary.py PARTS_DIR OUT_JSON [--print] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

GB = 1e9


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"{path.name}: {exc!r}"}


def _tests(xml: Path) -> dict:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": repr(exc)}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "")[:400]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            skips.append((case.find("skipped").get("message") or "")[:160])
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": sorted(set(skips))}


def merge(parts: Path, dry_run: bool) -> dict:
    result: dict = {"dry_run": dry_run, "stages": {}}
    for rec in sorted(parts.glob("stage-*.json"), key=lambda p: p.stat().st_mtime):
        stage = _load(rec)
        result["stages"][stage.get("stage", rec.stem)] = stage
    if (parts / "env.json").exists():
        result["env"] = _load(parts / "env.json")
    if (parts / "tests.xml").exists():
        result["tests"] = _tests(parts / "tests.xml")
    if (parts / "planner.json").exists():
        result["planner"] = _load(parts / "planner.json")
    if (parts / "planner_gap.json").exists():
        result["planner_gap"] = _load(parts / "planner_gap.json")
    if (parts / "kv-integrity.xml").exists():
        result["kv_integrity_tests"] = _tests(parts / "kv-integrity.xml")
    if (parts / "transfer.json").exists():
        result["transfer"] = _load(parts / "transfer.json")
    decode = {p.stem.removeprefix("decode-"): _load(p) for p in sorted(parts.glob("decode-*.json"))}
    if decode:
        result["decode"] = decode
        base, new = decode.get("no-offload-per-seq", {}), decode.get("no-offload", {})
        if "step_ms" in base and "step_ms" in new:
            result["decode_batched_over_per_seq"] = new["step_ms"]["median"] / base["step_ms"]["median"]
    if (parts / "host_overhead.json").exists():
        result["host_overhead"] = _load(parts / "host_overhead.json")
    return result


def _fmt(x, spec: str = ".1f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def summary(result: dict) -> list[str]:
    env = result.get("env", {})
    cuda = env.get("cuda", {})
    ver = env.get("versions", {})
    lines = [f"== gpu_check summary{' (DRY RUN, cpu backend)' if result['dry_run'] else ''}: "
             f"{cuda.get('device', 'no GPU')}, torch {ver.get('torch')}, "
             f"cupy {ver.get('cupy-cuda13x') or ver.get('cupy-cuda12x')} =="]
    lines.append("stages: " + " | ".join(f"{n} {'ok' if s.get('rc') == 0 else 'rc=' + str(s.get('rc'))} "
                                         f"{s.get('seconds')}s" for n, s in result["stages"].items()))
    t = result.get("tests")
    if t:
        lines.append(f"tests: {t.get('passed')} passed, {t.get('failed')} failed, {t.get('skipped')} skipped"
                     + "".join(f"\n  FAILED {f['test']}: {f['message'][:160]}" for f in t.get("failures", []))
                     + "".join(f"\n  skipped: {r}" for r in t.get("skip_reasons", [])[:4]))
    tr = result.get("transfer", {})
    if "copy" in tr:
        lines.append(f"copy {tr['rows'] * tr['row_bytes'] >> 20} MiB in {tr['row_bytes'] >> 10} KiB rows "
                     f"(host pinned: {tr.get('host_pinned')}), GB/s by wall clock [by the engine's busy_seconds]")
        lines.append(f"  {'':<36}{'H2D':>10}{'D2H':>10}{'[H2D':>8}{'D2H]':>8}")
        for name, fig in tr["copy"].items():
            busy = "".join(f"{_fmt(fig[d].get('busy_gb_per_s')):>8}" for d in ("h2d", "d2h")) if "engine" in name else ""
            lines.append(f"  {name:<36}{_fmt(fig['h2d']['gb_per_s']):>10}{_fmt(fig['d2h']['gb_per_s']):>10}{busy}")
        ratio = tr.get("engine_over_torch", {})
        lines.append(f"  {'engine_contiguous / torch_same_buffers':<36}{_fmt(ratio.get('h2d'), '.2f'):>10}"
                     f"{_fmt(ratio.get('d2h'), '.2f'):>10}")
        g = tr.get("gather", {})
        lines.append(f"gather {g.get('requests')} req x {g.get('blocks')} blocks (GB/s read+written): "
                     + ", ".join(f"{k} {_fmt(v['gb_per_s'])}" for k, v in g.items() if isinstance(v, dict)))
    elif tr:
        lines.append(f"transfer: {tr}")
    runs128 = tr.get("copy", {}).get("engine_runs128", {}).get("h2d", {}).get("gb_per_s")
    for policy, d in result.get("decode", {}).items():
        if "step_ms" not in d:
            lines.append(f"decode {policy}: {d}")
            continue
        link = (f", link floor {1e3 * d['h2d_bytes_per_step'] / (runs128 * GB):.1f} ms"
                if runs128 and d["h2d_bytes_per_step"] else "")
        lines.append(
            f"decode {policy} ({d['model']} {d['dtype']}, {d['requests']} req x {d['context']} ctx, "
            f"{d['decode_steps_full']}/{d['steps']} full steps): step {_fmt(d['step_ms']['median'], '.2f')} ms "
            f"(p10 {_fmt(d['step_ms']['p10'], '.2f')}, p90 {_fmt(d['step_ms']['p90'], '.2f')}), "
            f"{_fmt(d['tokens_per_s'], '.0f')} tok/s; host {_fmt(d['host_overhead_ms']['median'], '.2f')} ms "
            f"(schedule {_fmt(d['schedule_ms']['median'], '.2f')}), store index "
            f"{_fmt(d['store_index_ms']['median'], '.2f')} ms, stall {_fmt(d['stall_ms']['median'], '.2f')} ms; "
            f"H2D {_fmt(d['h2d_bytes_per_step'] / 1e6)} MB/step; HBM floor {_fmt(d['hbm_floor_ms'], '.2f')} ms{link}; "
            f"build {_fmt(d['build_s'])} s, prefill {_fmt(d['prefill_s'])} s")
    if "decode_batched_over_per_seq" in result:
        lines.append(f"decode no-offload step, batched paged attention / per-seq gather + SDPA: "
                     f"{result['decode_batched_over_per_seq']:.3f}")
    if "host_overhead" in result:
        lines.append(f"host overhead (null model): {result['host_overhead']}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--print", action="store_true", help="print the summary")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    result = merge(args.parts, args.dry_run)
    args.out.write_text(json.dumps(result, indent=1))
    if args.print:
        print("\n".join(summary(result)))


if __name__ == "__main__":
    main()
