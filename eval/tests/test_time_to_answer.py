"""Early-exit answers do not pay the link: over the paper reproduction's shaped link (namespaces,
tbf at 40 Mbit/s, 25 ms each way through link-relay), `edge-agent classify` reports the time to
each answer by where it was decided. A sample answered by an edge exit must come back well
within one round trip, even though most samples of its batch go to the cloud; cloud answers
take at least the round trip.

Skipped, with the reason, where network namespaces cannot be made (not root, no iproute2).
"""
import os
from pathlib import Path

import pytest

from classynet_eval import netlink
from classynet_eval.binaries import Bins, cloud_server, edge_classify

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))
MODEL = ROOT / "models" / "zoo" / "resnet110-7exit-cnc.onnx"
ONE_WAY_MS = 25.0


def test_edge_answers_come_back_within_a_round_trip_over_the_shaped_link(tmp_path):
    why = netlink.unavailable()
    if why:
        pytest.skip(f"shaped-link test skipped: {why}")
    bins = Bins(BIN_DIR)
    with netlink.Link(rate_mbit=40, delay_ms=ONE_WAY_MS, log_dir=tmp_path) as link:
        cloud = cloud_server(bins, MODEL, f"{netlink.CLOUD_IP}:0", None, 1, tmp_path / "cloud.log",
                             ns=netlink.CLOUD_NS)
        try:
            with link.endpoint(bins, cloud.port, "tta") as ep:
                out = edge_classify(bins, MODEL, "E2", ep.addr, "fashion-mnist:test", threads=1,
                                    concurrency=16, ns=netlink.EDGE_NS, timeout=600,
                                    extra=["--limit", "600"])
        finally:
            cloud.stop()
    by = out["latency_ms_by_place"]
    print(f"time to answer over {2 * ONE_WAY_MS:g} ms RTT: {by}")
    assert out["answered"]["degraded"] == 0
    assert by["edge"]["n"] > 50 and by["cloud"]["n"] > 50, by
    rtt = 2 * ONE_WAY_MS
    # Cloud answers cross the link twice; edge answers never wait for it, though they share
    # batches with samples that do (16 requests in flight, batches of up to 16).
    assert by["cloud"]["p50"] >= rtt
    assert by["edge"]["p50"] < rtt, f"edge answers wait for the link: {by}"
    assert by["edge"]["p50"] < by["cloud"]["p50"] / 2, by
