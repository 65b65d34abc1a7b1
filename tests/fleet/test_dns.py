"""An edge given one DNS name that resolves to several cloud replicas, as a Kubernetes headless
Service does: in a network namespace of its own, whose /etc/hosts (bind-mounted by `ip netns
exec` from /etc/netns/NAME/hosts) lists the name once per replica address.

* `edge-agent classify` through the name spreads its forwards over every replica;
* a running edge (--resolve-interval-s 1) starts sending to a replica added to the name, and stops
  sending to one removed from it, without a restart.

Needs root and `ip netns` (skipped otherwise, with the reason). Every process has a timeout and is
killed in a finally; the namespace and its /etc/netns folder are removed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from fleet import ort_env  # noqa: E402 - the scripts' helpers, found through the path above
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug")).resolve()
MODEL = ROOT / "models" / "zoo" / "tiny-3exit-cn.onnx"
PYTHON = ROOT / ".venv" / "bin" / "python"
NAME = "cloud.classynet.test"
PORT = 50051
REPLICAS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@pytest.fixture()
def netns(tmp_path):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    ns = f"classynet-dns-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    etc = Path("/etc/netns") / ns
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        etc.mkdir(parents=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        yield ns, etc / "hosts", procs, tmp_path
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)
        shutil.rmtree(etc, ignore_errors=True)


def hosts(path: Path, addrs: list[str]) -> None:
    # Rewritten in place (not renamed over): the namespace's /etc/hosts is a bind mount of this
    # very file, and a rename would leave the mount on the old one.
    with open(path, "r+") as f:
        f.seek(0)
        f.write("127.0.0.1 localhost\n" + "".join(f"{a} {NAME}\n" for a in addrs))
        f.truncate()


def start(ns: str, procs: list, log: Path, *cmd: str) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                         env=ort_env(), text=True)
    procs.append(p)
    return p


def wait_for(path: Path, pattern: str, timeout: float, proc: subprocess.Popen | None = None) -> re.Match:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        m = rx.search(path.read_text(errors="replace"))
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no /{pattern}/ in {path.name} within {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")


def start_replicas(ns: str, procs: list, tmp: Path) -> None:
    policy = tmp / "policy.toml"
    policy.write_text('version = 1\n[[exits]]\nname = "E1"\ndisabled = true\n')  # every sample needs the cloud
    for a in REPLICAS:
        log = tmp / f"cloud-{a}.log"
        p = start(ns, procs, log, str(BIN / "cloud-server"), "--model", str(MODEL), "--listen", f"{a}:{PORT}",
                  "--threads", "1", "--policy", str(policy))
        wait_for(log, r"cloud-server ready", 120, p)


def test_a_name_with_several_addresses_spreads_forwards_over_every_replica(netns):
    ns, hosts_file, procs, tmp = netns
    hosts(hosts_file, REPLICAS)
    start_replicas(ns, procs, tmp)
    out = subprocess.run(["ip", "netns", "exec", ns, str(BIN / "edge-agent"), "--model", str(MODEL),
                          "--partition", "E1", "--server", f"{NAME}:{PORT}", "--threads", "1",
                          "classify", "--limit", "600", "--concurrency", "32", "--json"],
                         capture_output=True, text=True, timeout=300, env=ort_env())
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    per = report["cloud_replicas"]
    assert sorted(per) == sorted(f"{a}:{PORT}" for a in REPLICAS), per
    assert report["answered"]["degraded"] == 0, report
    total = sum(per.values())
    # Spread, not one sticky connection: every replica carries a fair part of the forwards.
    assert all(n >= total / len(REPLICAS) / 2 for n in per.values()), per


def test_a_running_edge_follows_the_name_as_replicas_come_and_go(netns):
    ns, hosts_file, procs, tmp = netns
    hosts(hosts_file, REPLICAS[:2])
    start_replicas(ns, procs, tmp)
    log = tmp / "edge.log"
    edge = start(ns, procs, log, str(BIN / "edge-agent"), "--model", str(MODEL), "--partition", "E1",
                 "--server", f"{NAME}:{PORT}", "--listen", "127.0.0.1:8001", "--threads", "1",
                 "--resolve-interval-s", "1", "--metrics-listen", "127.0.0.1:9102")
    wait_for(log, r"edge-agent listening on", 120, edge)
    third = f"{REPLICAS[2]}:{PORT}"
    hosts(hosts_file, REPLICAS)
    wait_for(log, rf"cloud replica serving.*replica={re.escape(third)}|replica={re.escape(third)}.*cloud replica serving",
             15, edge)
    # Load from inside the namespace, then the edge's own count of forwards per replica.
    client = subprocess.run(["ip", "netns", "exec", ns, str(PYTHON), "-c", CLIENT, "127.0.0.1:8001", "300"],
                            capture_output=True, text=True, timeout=180, env=ort_env())
    assert client.returncode == 0, client.stderr[-3000:]
    per = forwards(ns)
    assert per.get(third, 0) > 0, f"no forwards to the added replica: {per}"
    # Removed from the name: retired, no more forwards.
    first = f"{REPLICAS[0]}:{PORT}"
    hosts(hosts_file, REPLICAS[1:])
    wait_for(log, r"cloud replicas.*removed=\[\"" + re.escape(first), 15, edge)
    before = forwards(ns).get(first, 0)
    client = subprocess.run(["ip", "netns", "exec", ns, str(PYTHON), "-c", CLIENT, "127.0.0.1:8001", "200"],
                            capture_output=True, text=True, timeout=180, env=ort_env())
    assert client.returncode == 0, client.stderr[-3000:]
    after = forwards(ns)
    assert after.get(first, 0) == before, f"forwards to a replica no longer in the name: {before} -> {after}"
    assert edge.poll() is None, "the edge stopped"


def forwards(ns: str) -> dict[str, float]:
    out = subprocess.run(["ip", "netns", "exec", ns, str(PYTHON), "-c",
                          "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9102/metrics', "
                          "timeout=5).read().decode())"], capture_output=True, text=True, timeout=30, check=True)
    per: dict[str, float] = {}
    for line in out.stdout.splitlines():
        m = re.match(r'classynet_cloud_forwards_total\{([^}]*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("outcome") == "ok":
                per[labels["endpoint"]] = per.get(labels["endpoint"], 0) + float(m.group(2))
    return per


# Sends N single-image requests, 8 at a time, to the edge at ADDR; exits 1 on any error.
CLIENT = f"""
import sys
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, {str(ROOT / 'scripts')!r})
import grpc
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pb_grpc
from fleet import infer_request
addr, n = sys.argv[1], int(sys.argv[2])
stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(addr))
model = stub.ModelMetadata(pb.ModelMetadataRequest(name=''), timeout=10).name
with ThreadPoolExecutor(8) as ex:
    list(ex.map(lambda i: stub.ModelInfer(infer_request(model, bytes([i % 256]) * 784, str(i)), timeout=10), range(n)))
"""
