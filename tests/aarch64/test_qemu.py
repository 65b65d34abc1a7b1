"""The aarch64 (Jetson) build of edge-agent, run under qemu-user against the x86-64 cloud-server:
it must answer what the native x86-64 edge-agent answers.

What this proves: the cross-built binary (scripts/build-aarch64, glibc 2.27) starts, loads the
aarch64 ONNX Runtime from the PyPI wheel through --ort-lib, runs the head partition with early
exits and talks the split protocol to a cloud-server. What it does not: speed on a real board
(qemu emulates the CPU, tens of times slower) or any GPU execution provider (docs/jetson.md).

Skips, with the reason, when CLASSYNET_SKIP_AARCH64=1, when qemu-aarch64 or the cross toolchain is
not installed (`scripts/build-aarch64 --check`; `scripts/build-aarch64` as root installs it), or
when the x86-64 binaries or the Fashion-MNIST package are missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))
ARM_BIN = ROOT / "target" / "cross" / "aarch64-unknown-linux-gnu" / "release"
ARM_ORT = ROOT / "target" / "aarch64-ort" / "libonnxruntime.so"
SYSROOT = Path("/usr/aarch64-linux-gnu")
MODEL = ROOT / "models" / "zoo" / "tiny-3exit-cn.onnx"
FASHION = Path("/usr/share/datasets/fashion-mnist")
SAMPLES = 300
# Samples whose early-exit decision may flip between the two builds: ONNX Runtime's aarch64 (NEON)
# and x86-64 (AVX2/AVX-512/AMX) kernels sum in different orders, so logits can differ in the last
# bits, and a sample whose confidence sits right at an exit's threshold can leave at another exit.
TOLERATED_FLIPS = 2

BUILD_TIMEOUT = 1800  # a first cross build in release on 2 cores; seconds when nothing changed
RUN_TIMEOUT = 900  # 300 samples under qemu: a few seconds here (tiny model), far more on a loaded machine


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDGE_AGENT_", "CLOUD_SERVER_", "CLASSYNET_", "QEMU_")) and k != "ORT_DYLIB_PATH"}
    env["RUST_LOG"] = "warn"
    return env


@pytest.fixture(scope="module")
def arm_build(tmp_path_factory) -> dict:
    if os.environ.get("CLASSYNET_SKIP_AARCH64") == "1":
        pytest.skip("CLASSYNET_SKIP_AARCH64=1")
    qemu = shutil.which("qemu-aarch64")
    if not qemu:
        pytest.skip("qemu-aarch64 is not installed (Debian qemu-user; scripts/build-aarch64 installs it)")
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        pytest.skip(f"no aarch64 loader in {SYSROOT} (Debian libc6-dev-arm64-cross; scripts/build-aarch64 installs it)")
    check = subprocess.run([str(ROOT / "scripts" / "build-aarch64"), "--check"], capture_output=True, text=True,
                           timeout=120)
    if check.returncode != 0:
        why = "; ".join(line.strip()[2:] for line in check.stdout.splitlines() if line.startswith("  - "))
        pytest.skip(f"the aarch64 cross toolchain is not installed (run scripts/build-aarch64 as root): {why}")
    for exe in ("cloud-server", "edge-agent"):
        if not (BIN / exe).exists():
            pytest.skip(f"{BIN / exe} is not built (cargo build, or set CLASSYNET_BIN_DIR)")
    if not any(FASHION.glob("t10k-images*")):
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION} (Debian dataset-fashion-mnist; scripts/setup)")

    start = time.monotonic()
    build = subprocess.run([str(ROOT / "scripts" / "build-aarch64")], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)
    took = time.monotonic() - start
    assert build.returncode == 0, f"scripts/build-aarch64 failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    glibc = sorted(set(re.findall(r"needs (GLIBC_[0-9.]+)", build.stdout)))
    note = f"scripts/build-aarch64: {took:.1f} s; the binaries need {', '.join(glibc) or '?'}"
    edge = ARM_BIN / "edge-agent"
    assert edge.exists() and ARM_ORT.exists()
    root = qemu_root(tmp_path_factory.mktemp("aarch64"))
    return {"qemu": qemu, "edge": edge, "ort": ARM_ORT.resolve(), "root": root, "note": note}


def qemu_root(where: Path) -> Path:
    """A root for `qemu-aarch64 -L`: qemu looks every absolute path up under it first and falls
    back to the host's. It holds two things.

    - /proc/cpuinfo of an aarch64 machine. qemu 7.2 (Debian 12) passes the host's x86-64 one
      through; ONNX Runtime's cpuinfo library finds no ARM core in it and crashes (SIGSEGV) while
      creating its environment. A real board has a real one.
    - The loader's library folders, pointing at /usr/aarch64-linux-gnu/lib (Debian's cross glibc
      and libstdc++), and an empty ld.so.cache. Otherwise the loader reads the host's cache and
      picks up the arm64 multiarch libc, a different glibc build than the cross loader, and the
      mix hangs.
    """
    root = where / "qemu-root"
    (root / "proc").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "ld.so.cache").write_bytes(b"")
    lib = root / "lib"
    lib.mkdir()
    for f in (SYSROOT / "lib").iterdir():
        (lib / f.name).symlink_to(f)
    (lib / "aarch64-linux-gnu").symlink_to(SYSROOT / "lib")
    try:  # as many cores as the host's /sys says (cpuinfo reads both)
        last = Path("/sys/devices/system/cpu/possible").read_text().strip().split(",")[-1].split("-")[-1]
        cpus = int(last) + 1
    except (OSError, ValueError):
        cpus = os.cpu_count() or 1
    core = ("processor\t: {n}\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n"
            "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd07\n"
            "CPU revision\t: 3\n\n")  # Cortex-A57, the CPU of the Jetson TX2 and Nano
    (root / "proc" / "cpuinfo").write_text("".join(core.format(n=n) for n in range(cpus)))
    return root


def cloud_server():
    """Starts the x86-64 cloud-server on a free loopback port; returns (process, address)."""
    err = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen([str(BIN / "cloud-server"), "--model", str(MODEL), "--listen", "127.0.0.1:0",
                          "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=err, text=True, env=clean_env())
    found = threading.Event()
    addr: list[str] = []

    def read():  # keeps draining stdout so that the server never blocks on a full pipe
        for line in p.stdout:
            m = re.search(r"cloud-server listening on (\S+)", line)
            if m and not addr:
                addr.append(m.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(60):
        p.kill()
        p.wait(timeout=10)
        err.seek(0)
        raise AssertionError(f"cloud-server did not start within 60 s: {err.read()[-2000:]}")
    return p, addr[0]


def classify(prefix: list[str], edge: Path, server: str, ort_lib: Path | None) -> tuple[dict, float]:
    # A long cloud timeout: an emulated edge must not turn slow round trips into degraded answers.
    cmd = prefix + [str(edge), "--model", str(MODEL), "--partition", "E1", "--server", server, "--threads", "1",
                    "--cloud-timeout-ms", "60000"]
    if ort_lib is not None:
        cmd += ["--ort-lib", str(ort_lib)]
    cmd += ["classify", "--limit", str(SAMPLES), "--json"]
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=clean_env())
    took = time.monotonic() - start
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-4000:]}"
    return json.loads(out.stdout), took


def moved_samples(a: dict, b: dict) -> int:
    """How many samples, at least, were answered differently: half the L1 distance between the two
    runs' per-exit confusion matrices (each moved sample leaves one cell and enters another)."""
    d = 0
    for ea, eb in zip(a["exits"], b["exits"]):
        for ra, rb in zip(ea["confusion"], eb["confusion"]):
            d += sum(abs(x - y) for x, y in zip(ra, rb))
    return (d + 1) // 2


def test_aarch64_edge_under_qemu_answers_like_the_native_edge(arm_build, capsys):
    cloud, addr = cloud_server()
    try:
        # -cpu cortex-a57: an Armv8.0 core (Jetson TX2, Nano), the oldest a Jetson has, so that
        # nothing newer than the baseline instruction set is used.
        qemu = [arm_build["qemu"], "-cpu", "cortex-a57", "-L", str(arm_build["root"])]
        arm, arm_s = classify(qemu, arm_build["edge"], addr, arm_build["ort"])
        native, native_s = classify([], BIN / "edge-agent", addr, None)
    finally:
        cloud.terminate()
        try:
            cloud.wait(timeout=20)
        except subprocess.TimeoutExpired:
            cloud.kill()
            cloud.wait(timeout=10)

    with capsys.disabled():  # the timings show in a plain `pytest -q` run too
        print(f"\n{arm_build['note']}")
        print(f"aarch64 edge-agent under qemu: {arm_s:.1f} s wall, {arm['samples_per_second']:.1f} samples/s, "
              f"latency p50 {arm['latency_ms']['p50']:.1f} ms")
        print(f"x86-64 edge-agent (native):    {native_s:.1f} s wall, {native['samples_per_second']:.1f} samples/s, "
              f"latency p50 {native['latency_ms']['p50']:.1f} ms")
        print(f"accuracy {arm['accuracy']:.4f} (aarch64) / {native['accuracy']:.4f} (x86-64); "
              f"answered {arm['answered']} / {native['answered']}")

    for r in (arm, native):
        assert r["samples"] == SAMPLES and r["failed"] == 0
        assert sum(r["answered"].values()) == SAMPLES and r["answered"]["degraded"] == 0
        assert sum(e["count"] for e in r["exits"]) == SAMPLES

    same = (arm["accuracy"] == native["accuracy"] and arm["answered"] == native["answered"]
            and [e["count"] for e in arm["exits"]] == [e["count"] for e in native["exits"]]
            and [e["confusion"] for e in arm["exits"]] == [e["confusion"] for e in native["exits"]])
    if not same:
        moved = moved_samples(arm, native)
        # classify --json reports per exit and class, not per sample; the confusion matrices bound
        # how many samples were answered differently.
        assert moved <= TOLERATED_FLIPS, (
            f"the aarch64 and x86-64 edges answered at least {moved} samples differently:\n"
            f"aarch64 {[e['count'] for e in arm['exits']]} {arm['answered']}\n"
            f"x86-64  {[e['count'] for e in native['exits']]} {native['answered']}")
        with capsys.disabled():
            print(f"note: {moved} sample(s) answered differently, within the {TOLERATED_FLIPS} that last-bit "
                  "float differences between the NEON and x86-64 kernels can flip at an exit threshold")
