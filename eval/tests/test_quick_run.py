"""The `--quick` reproduction end to end: real binaries, real namespaces, a shaped link.

Skipped, with the reason, where network namespaces cannot be made (not root, no iproute2).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from classynet_eval import netlink

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    why = netlink.unavailable()
    if why:
        pytest.skip(f"quick reproduction skipped: {why}")
    out = tmp_path_factory.mktemp("paper")
    p = subprocess.run([sys.executable, "-m", "classynet_eval.reproduce", "--quick", "--out", str(out),
                        "--bin-dir", str(BIN_DIR)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[1/" in p.stderr and "report written" in p.stderr, "progress is shown"
    return out, json.loads((out / "results.json").read_text())


def test_report_has_every_part_and_real_plots(report):
    out, _ = report
    text = (out / "README.md").read_text()
    for part in ("## 1. Exit efficiency", "## 2. Priority-class speedup", "## 3. Latency versus composition",
                 "## 4. Accuracy", "## 5. Memory budgets", "Link check", "INT8 against FP32", "On loopback",
                 "Adaptive split (beyond the paper)", "Pruning baselines"):
        assert part in text, part
    assert "not run" not in text.lower()
    for png in ("exit-distribution", "speedup", "composition", "budgets"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        assert f"({png}.png)" in text


def test_every_run_is_kept_as_json(report):
    out, res = report
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    # Five models (BN, BN + gating, CS-EE, CN, CN+C) at two budgets, two sets. Static: 40 on the
    # shaped link (FP32 and INT8), 20 on loopback; adaptive: 20 on each.
    assert len([r for r in runs if r.startswith("net-")]) == len(res["network"]["runs"]) == 100
    assert len([r for r in runs if "-auto-" in r]) == 40
    assert all(m["sha256"] and len(m["exit_macs"]) >= 1 for m in res["meta"]["models"].values())
    assert res["meta"]["commit"] and res["meta"]["machine"]["cores"]


def test_pruning_baselines_fit_their_budget_and_run_on_the_edge_alone(report):
    out, res = report
    pr = res["pruning"]
    for b in ("470kB", "112MB"):
        for m in ("sensitivity", "hrank"):
            r = pr[b][m]
            assert "missing" not in r, r
            # The paper's formula (params x 4 B x 16) holds, and no sample went to a cloud.
            assert r["fits"] and r["paper_formula_bytes"] <= {"470kB": 470_000, "112MB": 112_000_000}[b]
            assert r["answered"]["cloud"] == 0 and r["answered"]["edge"] == r["samples"] > 0
            assert (out / "runs" / f"pruning-{m}-{b}.json").is_file()
    assert pr["470kB"]["hrank"]["params"] <= 470_000 // 64 < pr["112MB"]["hrank"]["params"]
    assert pr["112MB"]["sensitivity"]["reduction"] == 0 and pr["470kB"]["sensitivity"]["reduction"] > 0.99


def test_link_check_matches_the_configured_link(report):
    _, res = report
    link = res["network"]["link"]
    m = link["measured"]
    assert link["delay_by"] in ("relay", "netem")
    # 2 x 5 ms configured; the relay is never early and a loaded 2-core machine adds a few ms.
    assert m["configured_rtt_ms"] <= m["rtt_ms_median"] < m["configured_rtt_ms"] + 15
    assert m["up_bytes_received"] == m["down_bytes_received"] == m["bytes"]
    # 1 MiB at 100 Mbit/s: the shaped rate holds within a factor of 1.5 (tbf's burst adds some).
    for way in ("up_mbit_s", "down_mbit_s"):
        assert 0.5 * m["configured_mbit_s"] < m[way] < 1.5 * m["configured_mbit_s"], m


def test_split_answers_do_not_depend_on_the_link(report):
    _, res = report
    runs = res["network"]["runs"]
    for name, r in runs.items():
        assert r["samples"] == 160 and r["answered"]["degraded"] == 0, name
        assert r["answered"]["edge"] + r["answered"]["cloud"] == 160, name
        if "-shaped-" in name and name.endswith("-fp32"):
            twin = runs[name.replace("-shaped-", "-loopback-")]
            if "-auto-" in name:
                # The adaptive edge cuts where each link favours: the same answers, given elsewhere.
                assert r["accuracy"] == twin["accuracy"], name
            else:
                assert (r["accuracy"], r["answered"]) == (twin["accuracy"], twin["answered"]), name
        if "-auto-" in name:
            # The cut changes where a sample is answered, never what: same accuracy as the static head.
            static = runs[name.replace("-auto-", "-")]
            assert r["accuracy"] == static["accuracy"], name
            assert sum(r["forwards_by_cut"].values()) >= 1, name
    # The policies of BN + gating and CS-EE reached the edge before the run (version 1).
    assert all(r["policy_version"] == 1 for n, r in runs.items() if "-bn+gate-" in n or "-cs-ee-" in n)


def test_cs_ee_answers_only_its_targeted_class_early_and_is_in_the_tables(report):
    out, res = report
    target = res["meta"]["assignment"][0]
    for e in res["efficiency"]["cs-ee"]["exits"][:-1]:
        predicted = [sum(col) for col in zip(*e["confusion"])]
        assert all(n == 0 for k, n in enumerate(predicted) if k != target), (e["name"], predicted)
    # In part 2 each priority class ran through the CS-EE policy that targets it.
    for row in res["speedup"].values():
        m = row["models"]["cs-ee"]
        assert m["samples"] > 0 and m["mean_macs"] > 0
    text = (out / "README.md").read_text()
    assert "| CS-EE | 5.77× |" in text and "CN+C is faster than CS-EE for the top-priority class" in text
