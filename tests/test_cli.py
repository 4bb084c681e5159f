"""The `orbitflow` command: help, generation on a preset, clear errors."""

import subprocess
import sys

import pytest

from orbitflow_ray.cli import main, parse_bytes


def test_parse_bytes():
    assert parse_bytes("64MiB") == 64 << 20
    assert parse_bytes("1g") == 1 << 30
    assert parse_bytes("4096") == 4096


def test_help_lists_engine_flags():
    out = subprocess.run([sys.executable, "-m", "orbitflow_ray.cli", "generate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--kv-policy", "--device-kv-bytes", "--link-bandwidth-bytes-per-s", "--prompt"):
        assert flag in out


def test_generate_on_a_preset(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt-ids", "1,2,3", "--max-tokens", "4",
                 "--kv-policy", "all-offload", "--device-kv-bytes", "1MiB", "--host-kv-bytes", "1MiB"]) == 0
    captured = capsys.readouterr()
    ids = captured.out.strip().strip("[]").split(",")
    assert len(ids) == 4
    assert "TTFT" in captured.err


def test_unknown_policy_is_a_clear_error(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt-ids", "1", "--kv-policy", "bogus"]) == 2
    assert "unknown kv_policy 'bogus'" in capsys.readouterr().err


def test_policies_lists_builtins(capsys):
    assert main(["policies"]) == 0
    assert {"no-offload", "all-offload", "static-uniform"} <= set(capsys.readouterr().out.split())


def test_serve_execs_serve_run_with_the_api_key_in_the_environment(monkeypatch, tmp_path):
    import orbitflow_ray.serving.cli as serve_cli

    cfg = tmp_path / "config.yaml"
    cfg.write_text("applications: []\n")
    calls = []
    monkeypatch.setattr(serve_cli.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    assert main(["serve", "--config", str(cfg), "--api-key", "sk-0123456789"]) == 0
    (path, argv, env), = calls
    assert argv[1:] == ["run", str(cfg)] and path.endswith("serve")
    assert env["ORBITFLOW_API_KEY"] == "sk-0123456789"
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2  # a clear error, no exec


def test_calibrate_scale_shrinks_lengths_and_is_checked(capsys):
    from orbitflow_ray.sim.calibrate import PROBE_CONTEXTS, scaled_lengths

    assert scaled_lengths(PROBE_CONTEXTS, 1.0) == PROBE_CONTEXTS
    assert scaled_lengths((128, 512, 1536, 20), 0.4) == (51, 205, 614, 16)  # at least 16 tokens each
    with pytest.raises(ValueError, match="scale"):
        scaled_lengths(PROBE_CONTEXTS, 1.5)
    with pytest.raises(SystemExit):
        main(["calibrate", "--scale", "0", "--out", "unused"])
    assert "--scale" in capsys.readouterr().err
