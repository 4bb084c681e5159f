"""The comparison report writer: files, JSON schema, markdown figures, PNGs (fast, no simulation)."""

import json

import numpy as np

from orbitflow_ray.metrics.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POLICIES = ["deepspeed", "flexgen", "orbitflow"]
RATES = [1.0, 2.0]
SCALES = [1.0, 2.5]
# hand-made case at rate 2, scale 2.5: orbitflow vs the best baseline for each metric
HAND = {"deepspeed": dict(tpot_attainment=0.50, tbt_attainment=0.70, p95_tbt_s=0.200, throughput_tok_s=1000.0,
                          goodput_req_s=0.40, ttft_attainment=0.90, p95_ttft_s=4.0),
        "flexgen": dict(tpot_attainment=0.625, tbt_attainment=0.60, p95_tbt_s=0.160, throughput_tok_s=1200.0,
                        goodput_req_s=0.50, ttft_attainment=0.80, p95_ttft_s=2.5),
        "orbitflow": dict(tpot_attainment=0.875, tbt_attainment=0.95, p95_tbt_s=0.100, throughput_tok_s=1800.0,
                          goodput_req_s=0.60, ttft_attainment=0.85, p95_ttft_s=3.0)}


def _metrics(i: int, rate: float, scale: float) -> dict:
    att = min(1.0, 0.4 + 0.2 * i + 0.1 * scale - 0.1 * rate)
    return dict(tpot_attainment=att, tbt_attainment=min(1.0, att + 0.05), ttft_attainment=0.9,
                p50_tbt_s=0.05, p95_tbt_s=0.1 / (i + 1), p99_tbt_s=0.2, p95_tbt_over_slo=2.0 / (i + 1) / scale,
                p50_tpot_s=0.05, p95_tpot_s=0.08, p95_ttft_s=1.0, p95_e2e_s=20.0,
                throughput_tok_s=500.0 * (i + 1) * rate, output_tok_s=100.0, goodput_req_s=0.5 * rate,
                num_requests=50, num_finished=49, num_failed=1, total_pauses=3 * i, max_pause_s=0.5,
                link_bytes_per_output_token=1e6, num_steps=1000, peak_device_kv_bytes=1e9, makespan_s=60.0)


def _runs() -> list[dict]:
    rng = np.random.default_rng(0)
    runs = []
    for scale in SCALES:
        for i, policy in enumerate(POLICIES):
            for rate in RATES:
                m = _metrics(i, rate, scale)
                if (rate, scale) == (2.0, 2.5):
                    m.update(HAND[policy])
                samples = np.sort(rng.lognormal(-0.5 + 0.3 * (2 - i), 0.6, 2000)).tolist()
                runs.append({"policy": policy, "rate": rate, "slo_scale": scale, "metrics": m,
                             "tbt_over_slo": samples})
    return runs


def test_writes_all_files_with_exact_json_schema(tmp_path):
    runs = _runs()
    paths = write_report(runs, tmp_path / "out", context={"model": "llama-3.1-8b", "tp": 1,
                                                          "tpot_slo_s": {"1.0": 0.05, "2.5": 0.125}})
    names = {"report.json", "report.md", "attainment_vs_rate.png", "tbt_cdf.png", "p95_vs_slo_scale.png",
             "throughput_vs_rate.png"}
    assert set(paths) == names
    assert all(p.exists() and p.parent == tmp_path / "out" for p in paths.values())
    doc = json.loads(paths["report.json"].read_text())
    assert set(doc) == {"runs", "context"}
    assert doc["context"]["model"] == "llama-3.1-8b"
    assert [set(r) for r in doc["runs"]] == [{"policy", "rate", "slo_scale", "metrics"}] * len(runs)
    assert doc["runs"] == [{k: r[k] for k in ("policy", "rate", "slo_scale", "metrics")} for r in runs]
    assert "\"tbt_over_slo\"" not in paths["report.json"].read_text()
    for name in names - {"report.json", "report.md"}:
        data = paths[name].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name


def test_markdown_tables_and_gain_figures(tmp_path):
    md = write_report(_runs(), tmp_path, title="Demo")["report.md"].read_text()
    assert md.startswith("# Demo")
    for policy in POLICIES:
        assert f"`{policy}`" in md
    assert "## SLO scale 1" in md and "## SLO scale 2.5" in md
    assert "TPOT att. @2/s" in md and "87.5%" in md
    assert "*goodput*: requests per second meeting all three SLOs" in md
    head = next(line for line in md.splitlines() if line.startswith("| policy"))
    assert head.startswith("| policy | goodput req/s @1/s | TTFT att. @1/s | P95 TTFT @1/s | TPOT att. @1/s | "
                           "TBT att. @1/s | P95 TBT/SLO @1/s |")
    # orbitflow at rate 2, scale 2.5: the cells after its rate-1 columns (9 per rate)
    row = next(line for line in md.split("## SLO scale 2.5")[1].splitlines() if line.startswith("| `orbitflow`"))
    assert row.split(" | ")[10:15] == ["0.600", "85.0%", "3.00 s", "87.5%", "95.0%"]
    gain = next(line for line in md.splitlines()
                if line.startswith("- 2 req/s") and "TPOT attainment +25.0 pp (vs `flexgen`)" in line)
    assert "TBT attainment +25.0 pp (vs `deepspeed`)" in gain
    assert "P95 TBT 37.5% lower (vs `flexgen`)" in gain
    assert "throughput 1.50x (vs `flexgen`)" in gain
    assert "goodput 1.20x (vs `flexgen`)" in gain
    assert "TTFT attainment -5.0 pp (vs `deepspeed`)" in gain
    assert "P95 TTFT 20.0% higher (vs `flexgen`)" in gain
    assert "](attainment_vs_rate.png)" in md and "](tbt_cdf.png)" in md


def test_none_metrics_single_rate_and_single_policy_do_not_crash(tmp_path):
    runs = _runs()
    runs[0]["metrics"] = {k: None for k in runs[0]["metrics"]}
    runs[1]["metrics"]["p95_tbt_over_slo"] = float("nan")
    runs[2]["tbt_over_slo"] = []
    paths = write_report(runs, tmp_path / "a")
    doc = json.loads(paths["report.json"].read_text())
    assert doc["runs"][1]["metrics"]["p95_tbt_over_slo"] is None
    assert "| `deepspeed` | - | - |" in paths["report.md"].read_text()

    one = [{"policy": "orbitflow", "rate": 1.0, "slo_scale": 1.0, "metrics": {"tpot_attainment": None}}]
    paths = write_report(one, tmp_path / "b")
    assert "p95_vs_slo_scale.png" not in paths and "attainment_vs_rate.png" not in paths
    assert "no baseline policy" in paths["report.md"].read_text()
    assert json.loads(paths["report.json"].read_text())["context"] == {}

    paths = write_report([], tmp_path / "c")
    assert set(paths) == {"report.json", "report.md"}
