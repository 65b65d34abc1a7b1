"""The emulated edge–cloud link: two network namespaces joined by a veth pair, the rate shaped by
`tbf` on each end's egress, the one-way delay added by `netem` where the kernel has it and
otherwise by this project's link-relay (link-relay/) running in the edge namespace.

    edge ns (10.213.47.1)                                      cloud ns (10.213.47.2)
    edge-agent -> 127.0.0.1:R link-relay --(veth, tbf)--> cloud-server
                  (delays every chunk, each way, by the one-way delay)

Only addresses inside the two namespaces are used; both are removed on exit (also after an
error), and leftovers of an interrupted run are removed before a new one starts.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .binaries import Bins, EvalError, Service, link_relay, ns_exec

EDGE_NS, CLOUD_NS = "cnpaper-edge", "cnpaper-cloud"
EDGE_IF, CLOUD_IF = "cnp-edge", "cnp-cloud"
EDGE_IP, CLOUD_IP = "10.213.47.1", "10.213.47.2"


def _sh(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise EvalError(f"`{' '.join(cmd)}` failed: {p.stderr.strip()}")
    return p


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "the network experiment needs root (it creates network namespaces and tc qdiscs); run it as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package iproute2)"
    probe = "cnpaper-probe"
    _sh(["ip", "netns", "del", probe], check=False)
    p = _sh(["ip", "netns", "add", probe], check=False)
    if p.returncode != 0:
        return f"cannot create a network namespace: {p.stderr.strip()}"
    _sh(["ip", "netns", "del", probe], check=False)
    return None


def _cleanup() -> None:
    for ns in (EDGE_NS, CLOUD_NS):
        _sh(["ip", "netns", "del", ns], check=False)


@dataclass
class Link:
    rate_mbit: float
    delay_ms: float
    delay_by: str = "auto"  # auto | netem | relay
    log_dir: Path = Path("/tmp")
    used: str = field(init=False, default="")
    tc: list[str] = field(init=False, default_factory=list)

    def __enter__(self) -> "Link":
        _cleanup()
        try:
            self._create()
        except BaseException:
            _cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        _cleanup()

    def _create(self) -> None:
        for ns in (EDGE_NS, CLOUD_NS):
            _sh(["ip", "netns", "add", ns])
            _sh(ns_exec(ns) + ["ip", "link", "set", "lo", "up"])
        _sh(["ip", "link", "add", EDGE_IF, "netns", EDGE_NS, "type", "veth", "peer", "name", CLOUD_IF,
             "netns", CLOUD_NS])
        for ns, dev, ip in ((EDGE_NS, EDGE_IF, EDGE_IP), (CLOUD_NS, CLOUD_IF, CLOUD_IP)):
            _sh(ns_exec(ns) + ["ip", "addr", "add", f"{ip}/30", "dev", dev])
            _sh(ns_exec(ns) + ["ip", "link", "set", dev, "up"])
        netem = self._has_netem()
        if self.delay_by == "netem" and not netem:
            raise EvalError("--link-delay netem was asked for, but this kernel has no netem qdisc")
        self.used = "netem" if (netem and self.delay_by != "relay") else "relay"
        # tbf's bucket must hold the largest packet the veth hands it: with segmentation offload
        # that is a 64 KiB super-packet, so the burst is never below 96 KiB.
        rate_bps = self.rate_mbit * 1e6 / 8
        burst = max(96 * 1024, int(rate_bps / 100))
        for ns, dev in ((EDGE_NS, EDGE_IF), (CLOUD_NS, CLOUD_IF)):
            if self.used == "netem":
                cmds = [["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
                         f"{self.delay_ms:g}ms", "limit", "100000"],
                        ["tc", "qdisc", "add", "dev", dev, "parent", "1:", "handle", "10:", "tbf", "rate",
                         f"{self.rate_mbit:g}mbit", "burst", str(burst), "latency", "200ms"]]
            else:
                cmds = [["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.rate_mbit:g}mbit",
                         "burst", str(burst), "latency", "200ms"]]
            for c in cmds:
                _sh(ns_exec(ns) + c)
                self.tc.append(f"[{ns}] " + " ".join(c))

    def set_rate(self, rate_mbit: float) -> None:
        """Changes the rate of both directions in place (`tc qdisc change`): connections stay open."""
        rate_bps = rate_mbit * 1e6 / 8
        burst = max(96 * 1024, int(rate_bps / 100))
        for ns, dev in ((EDGE_NS, EDGE_IF), (CLOUD_NS, CLOUD_IF)):
            parent = ["parent", "1:", "handle", "10:"] if self.used == "netem" else ["root"]
            _sh(ns_exec(ns) + ["tc", "qdisc", "change", "dev", dev, *parent, "tbf", "rate", f"{rate_mbit:g}mbit",
                               "burst", str(burst), "latency", "200ms"])

    def _has_netem(self) -> bool:
        p = _sh(ns_exec(EDGE_NS) + ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], check=False)
        if p.returncode == 0:
            _sh(ns_exec(EDGE_NS) + ["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
            return True
        return False

    def endpoint(self, bins: Bins, cloud_port: int, name: str) -> "Endpoint":
        """Where the edge connects to reach a cloud-server on CLOUD_IP:cloud_port over this link."""
        if self.used == "netem":
            return Endpoint(f"{CLOUD_IP}:{cloud_port}", None)
        relay = link_relay(bins, f"{CLOUD_IP}:{cloud_port}", self.delay_ms, self.log_dir / f"relay-{name}.log",
                           ns=EDGE_NS)
        return Endpoint(f"127.0.0.1:{relay.port}", relay)

    def describe(self) -> dict:
        return {"rate_mbit": self.rate_mbit, "one_way_delay_ms": self.delay_ms, "delay_by": self.used,
                "edge_ns": EDGE_NS, "cloud_ns": CLOUD_NS, "edge_ip": EDGE_IP, "cloud_ip": CLOUD_IP, "tc": self.tc}


@dataclass
class Endpoint:
    addr: str
    relay: Service | None

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        if self.relay:
            self.relay.stop()


def validate(link: Link, bins: Bins, nbytes: int) -> dict:
    """Measured round-trip time and throughput each way across the link, next to the configured ones."""
    import json

    py = sys.executable
    server = Service(ns_exec(CLOUD_NS) + [py, "-m", "classynet_eval.probe", "serve", "--listen", f"{CLOUD_IP}:0",
                                          "--seconds", "300"], bins.env(), link.log_dir / "probe.log", "link probe")
    try:
        with link.endpoint(bins, server.port, "probe") as ep:
            p = subprocess.run(ns_exec(EDGE_NS) + [py, "-m", "classynet_eval.probe", "measure", "--to", ep.addr,
                                                   "--bytes", str(nbytes)],
                               capture_output=True, text=True, timeout=300)
            if p.returncode != 0:
                raise EvalError(f"link probe failed: {p.stderr.strip()[-800:]}")
            got = json.loads(p.stdout)
    finally:
        server.stop()
    got["configured_rtt_ms"] = 2 * link.delay_ms
    got["configured_mbit_s"] = link.rate_mbit
    return got
