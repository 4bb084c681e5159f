"""bench/sim_results.py as users run it: a small grid per seed, then the runs merged into one set of tables."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--setups", "8b-a100-sharegpt", "--requests", "12", "--rate-index", "0", "--scales", "1.5",
        "--policies", "orbitflow,no-offload", "--cache", "", "--jobs", "1"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "sim_results.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_runs_per_seed_merge_into_the_tables_of_both(tmp_path):
    for seed in (0, 1):
        done = _run(*GRID, "--seeds", str(seed), "--out", str(tmp_path / f"s{seed}"))
        assert done.returncode == 0, done.stderr[-2000:]
    runs = [json.loads((tmp_path / f"s{seed}" / "summary.json").read_text()) for seed in (0, 1)]
    assert [e["seed"] for d in runs for e in d] == [0, 1]
    assert len({e["code_version"] for d in runs for e in d}) == 1
    done = _run("--merge", f"{tmp_path / 's0'},{tmp_path / 's1'}", "--policies", "orbitflow,no-offload",
                "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    seeds_md = (tmp_path / "merged" / "seeds.md").read_text()
    assert "mean of seeds [0, 1]" in seeds_md and "| `orbitflow` |" in seeds_md
    # the merged means are the means of the two runs' goodputs, and the bar judges those
    good = {p: sum(next(r["metrics"]["goodput_req_s"] for r in d[0]["runs"] if r["policy"] == p) for d in runs) / 2
            for p in ("orbitflow", "no-offload")}
    assert f"| `orbitflow` | {good['orbitflow']:.4f} |" in seeds_md
    met = int(good["orbitflow"] >= 0.98 * good["no-offload"])
    assert f"Met in {met} of 1 cells." in (tmp_path / "merged" / "bar.md").read_text()
    # the same seed twice is refused, by name
    twice = _run("--merge", f"{tmp_path / 's0'},{tmp_path / 's0'}", "--out", str(tmp_path / "bad"))
    assert twice.returncode != 0 and "appears twice" in twice.stderr
