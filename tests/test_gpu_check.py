"""The GPU check script's CPU mode (issue 15): every step but the CUDA-only ones, tiny shapes,
so `make gpu-check` cannot rot while no GPU is around. Slow (minutes on the CPU): `make test-slow`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from benchmarks import gpu_check


@pytest.mark.slow  # minutes on a loaded CPU: `make test-slow`, not `make test`
def test_cpu_mode_runs_every_step_and_writes_json_and_junit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = gpu_check.main(["--cpu", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    failed = {k: v["error"][-800:] for k, v in report["steps"].items() if v["status"] == "fail"}
    assert rc == 0 and not failed, failed
    assert set(report["steps"]) == {name for name, _, _ in gpu_check.STEPS}
    suite = ET.parse(tmp_path / "out" / "gpu_check.xml").getroot()
    assert suite.get("tests") == str(len(gpu_check.STEPS)) and suite.get("failures") == "0"

    r = report["results"]
    assert r["ceilings"]["matmul_flops"] > 0 and r["ceilings"]["copy_bytes_per_s"] > 0
    assert len(r["attention_kernels"]) == len(gpu_check.POS_ENCS)  # CPU mode: gqa only
    assert all(set(row) == {"train", "eval", "decode"} for row in r["attention_kernels"].values())
    # The math backend never picks a fused kernel; sdpa's error stays small.
    assert all(v["grad_rel_err"] < 0.1 for v in r["bf16_error"].values())
    # No host read inside a training step except at logging steps (dense and MoE).
    for preset in ("llama", "mixtral"):
        assert r["host_syncs"][preset]["max_between_logging_steps"] == 0, r["host_syncs"][preset]
    for label in ("budget_llama", "budget_mixtral", "gpt2_124m"):
        assert {"as_is", "sync_free", "fused"} <= set(r["step_time"][label])
    assert r["step_time"]["budget_llama"]["compiled"]["step_ms"] > 0
    assert {f"llama/b{b}" for b in (1, 8, 64)} <= set(r["decode"])
    assert r["mini_sweep"]["eval_device"] and r["mini_sweep"]["trials_per_hour"] > 0
    assert os.path.exists(tmp_path / "out" / "gpu_check.xml")
