"""The aarch64 (Jetson) builds of edge-agent, run under qemu-user against the x86-64 cloud-server:
they must answer what the native x86-64 edge-agent answers.

What this proves: the cross-built binaries (scripts/build-aarch64, glibc 2.27) start; the default
build loads the aarch64 ONNX Runtime from the PyPI wheel through --ort-lib; the tract-only build
needs no library but glibc (checked in its ELF), downloads its head from the cloud and answers
with tract; both run the head partition with early exits and talk the split protocol to a
cloud-server. What it does not: speed on a real board (qemu emulates the CPU, tens of times
slower), a real glibc 2.27 system, or any GPU execution provider (docs/jetson.md).

Skips, with the reason, when CLASSYNET_SKIP_AARCH64=1, when qemu-aarch64 or the cross toolchain is
not installed (`scripts/build-aarch64 --check`; `scripts/build-aarch64` as root installs it), or
when the x86-64 binaries or the Fashion-MNIST package are missing.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))
ARM_BIN = ROOT / "target" / "cross" / "aarch64-unknown-linux-gnu" / "release"
ARM_TRACT = ARM_BIN / "tract" / "edge-agent"  # built with --no-default-features --features tract
ARM_ORT = ROOT / "target" / "aarch64-ort" / "libonnxruntime.so"
SYSROOT = Path("/usr/aarch64-linux-gnu")
MODEL = ROOT / "models" / "zoo" / "tiny-3exit-cn.onnx"
RESNET = ROOT / "models" / "zoo" / "resnet110-7exit-cnc.onnx"  # the model deploy/ installs
FASHION = Path("/usr/share/datasets/fashion-mnist")
SAMPLES = 300
# Samples whose early-exit decision may flip between the two builds: ONNX Runtime's aarch64 (NEON)
# and x86-64 (AVX2/AVX-512/AMX) kernels sum in different orders, so logits can differ in the last
# bits, and a sample whose confidence sits right at an exit's threshold can leave at another exit.
TOLERATED_FLIPS = 2

BUILD_TIMEOUT = 1800  # a first cross build in release on 2 cores; seconds when nothing changed
RUN_TIMEOUT = 900  # 300 samples under qemu: a few seconds here (tiny model), far more on a loaded machine
# The tract-only edge, served, per model: samples sent (under qemu here: tiny 300 in about 2 s,
# ResNet-110 64 in about 16 s; tract is slower there than ONNX Runtime).
TRACT_CASES = [pytest.param(MODEL, 300, id="tiny-3exit-cn"), pytest.param(RESNET, 64, id="resnet110-7exit-cnc")]
TRACT_BATCH = 16  # samples per ModelInfer request, the edge's default --max-batch
TRACT_PARTITION = "E2"  # the head holds exits 1 and 2 of 3; the cloud answers the rest at exit 3
START_TIMEOUT = 300  # from launch to "listening": download, compile and warm up the head under qemu
GLIBC_FLOOR = (2, 27)
# What a glibc-only binary may need: glibc's own libraries and the loader.
GLIBC_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libutil.so.1",
              "ld-linux-aarch64.so.1"}


def clean_env(log: str = "warn") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDGE_AGENT_", "CLOUD_SERVER_", "CLASSYNET_", "QEMU_")) and k != "ORT_DYLIB_PATH"}
    env["RUST_LOG"] = log
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
    assert edge.exists() and ARM_ORT.exists() and ARM_TRACT.exists()
    root = qemu_root(tmp_path_factory.mktemp("aarch64"))
    # -cpu cortex-a57: an Armv8.0 core (Jetson TX2, Nano), the oldest a Jetson has, so that
    # nothing newer than the baseline instruction set is used.
    prefix = [qemu, "-cpu", "cortex-a57", "-L", str(root)]
    return {"qemu": qemu, "prefix": prefix, "edge": edge, "tract_edge": ARM_TRACT, "ort": ARM_ORT.resolve(),
            "root": root, "note": note}


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


class Server:
    """A server process started on a free loopback port: its address once it says `NAME listening
    on ADDR` on stdout, and its log (stderr) for reading afterwards."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], timeout: float = 60):
        self.err = tempfile.TemporaryFile(mode="w+")
        start = time.monotonic()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        found = threading.Event()
        addr: list[str] = []

        def read():  # keeps draining stdout so that the server never blocks on a full pipe
            for line in self.p.stdout:
                m = re.search(rf"{name} listening on (\S+)", line)
                if m and not addr:
                    addr.append(m.group(1))
                    found.set()
            found.set()  # exited

        threading.Thread(target=read, daemon=True).start()
        found.wait(timeout)
        self.start_s = time.monotonic() - start
        if not addr:
            self.stop()
            raise AssertionError(f"{name} did not start within {timeout:.0f} s ({' '.join(cmd)}; exit "
                                 f"{self.p.returncode}):\n{self.log()[-4000:]}")
        self.addr = addr[0]

    def log(self) -> str:
        self.err.seek(0)
        return re.sub(r"\x1b\[[0-9;]*m", "", self.err.read())  # without colours, if any

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)


def cloud_server(model: Path = MODEL) -> Server:
    """The x86-64 cloud-server (ONNX Runtime from the project's .venv) with the full model."""
    return Server("cloud-server", [str(BIN / "cloud-server"), "--model", str(model), "--listen", "127.0.0.1:0",
                                   "--threads", "1"], clean_env())


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
    cloud = cloud_server()
    try:
        arm, arm_s = classify(arm_build["prefix"], arm_build["edge"], cloud.addr, arm_build["ort"])
        native, native_s = classify([], BIN / "edge-agent", cloud.addr, None)
    finally:
        cloud.stop()

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


# --- The tract-only edge-agent: one file, nothing to install -----------------------------------

def elf_facts(path: Path) -> dict:
    """What an aarch64 ELF needs from the system, read with the cross binutils that
    scripts/build-aarch64 installs: its NEEDED libraries, the newest glibc symbol version it asks
    for, whether it names ONNX Runtime (the library or its entry point, which any loader of it
    must look up) and its symbols that come from the `ort` / `ort-sys` crates."""
    def tool(*args: str) -> str:
        r = subprocess.run(list(args) + [str(path)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(args)} {path}: {r.stderr[-2000:]}"
        return r.stdout

    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", tool("aarch64-linux-gnu-readelf", "-d", "-W"))
    glibc = [tuple(int(x) for x in v.split(".")) for v in
             re.findall(r"\bGLIBC_([0-9]+(?:\.[0-9]+)+)\b", tool("aarch64-linux-gnu-objdump", "-T"))]
    symbols = tool("aarch64-linux-gnu-nm", "-C", "--defined-only").splitlines()
    data = path.read_bytes()
    return {
        "needed": needed,
        "glibc": max(glibc) if glibc else None,
        "entry_point": b"OrtGetApiBase" in data,
        "names_library": b"libonnxruntime" in data,
        "symbols": len(symbols),
        "ort_symbols": [s for s in symbols if re.search(r"\bort(_sys)?::", s)],
        "size": len(data),
    }


def fmt_version(v: tuple[int, ...] | None) -> str:
    return "GLIBC_" + ".".join(map(str, v)) if v else "no versioned glibc symbol"


def test_tract_only_aarch64_edge_needs_nothing_but_glibc_2_27(arm_build, tmp_path, capsys):
    tract, ort = elf_facts(arm_build["tract_edge"]), elf_facts(arm_build["edge"])
    # The same checks find ONNX Runtime in the default build, so they can fail.
    assert ort["entry_point"] and ort["names_library"] and ort["ort_symbols"], (
        "the checks below find nothing in the default (ONNX Runtime) edge-agent either, so they prove nothing: "
        f"entry point {ort['entry_point']}, library name {ort['names_library']}, "
        f"{len(ort['ort_symbols'])} ort symbols")

    assert tract["needed"], "no NEEDED entries: not a dynamically linked glibc program?"
    assert not [n for n in tract["needed"] if "onnxruntime" in n], tract["needed"]
    assert set(tract["needed"]) <= GLIBC_LIBS, (
        f"the tract-only edge-agent needs libraries beyond glibc: {sorted(set(tract['needed']) - GLIBC_LIBS)}")
    assert tract["glibc"] is not None and tract["glibc"] <= GLIBC_FLOOR, (
        f"the tract-only edge-agent needs {fmt_version(tract['glibc'])}, newer than glibc 2.27 (JetPack 4.6)")
    assert not tract["entry_point"], "the tract-only edge-agent names OrtGetApiBase: it can load ONNX Runtime"
    assert tract["symbols"] > 1000, "the binary has no symbol table, so the ort-code check below would prove nothing"
    assert not tract["ort_symbols"], f"code of the ort crate in the tract-only build: {tract['ort_symbols'][:5]}"

    # Asking it for ONNX Runtime is a clear error, not a library search.
    r = subprocess.run(arm_build["prefix"] + [str(arm_build["tract_edge"]), "--backend", "ort", "--model", str(MODEL),
                                              "--partition", TRACT_PARTITION, "classify", "--limit", "1"],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT, env=clean_env())
    assert r.returncode != 0 and "this build has no ort engine" in r.stderr, (r.returncode, r.stderr[-2000:])

    stripped = tmp_path / "edge-agent.stripped"
    subprocess.run(["aarch64-linux-gnu-strip", "-o", str(stripped), str(arm_build["tract_edge"])], check=True,
                   timeout=300)
    with capsys.disabled():
        print(f"\ntract-only aarch64 edge-agent: needs {' '.join(tract['needed'])}; {fmt_version(tract['glibc'])}; "
              f"{tract['size'] / 1e6:.1f} MB, stripped {stripped.stat().st_size / 1e6:.1f} MB "
              f"(the default build: {ort['size'] / 1e6:.1f} MB, plus libonnxruntime)")


def fashion_test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Fashion-MNIST test images as raw pixels [n, 1, 28, 28] (uint8, what a camera
    sends; the edge normalises them) and their labels."""
    with gzip.open(next(FASHION.glob("t10k-images*")), "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(next(FASHION.glob("t10k-labels*")), "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images[:n].copy(), labels[:n].astype(np.int64)


def ask(addr: str, model: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per sample (label, exit) from an edge's local v2 API, TRACT_BATCH images per ModelInfer."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=addr)
    labels, exits = [], []
    start = time.monotonic()
    for i in range(0, len(x), TRACT_BATCH):
        batch = x[i:i + TRACT_BATCH]
        inp = grpcclient.InferInput("input", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        r = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in ("label", "exit")],
                         client_timeout=RUN_TIMEOUT)
        labels.append(r.as_numpy("label"))
        exits.append(r.as_numpy("exit"))
    took = time.monotonic() - start
    client.close()
    return np.concatenate(labels), np.concatenate(exits), took


def engine_line(log: str) -> str:
    m = re.search(r"inference engine \S+: .*", log)
    return m.group(0) if m else ""


@pytest.mark.parametrize(("model", "samples"), TRACT_CASES)
def test_tract_only_aarch64_edge_under_qemu_answers_like_the_native_edge(arm_build, capsys, model, samples):
    """The tract-only edge as it would run on a JetPack 4.6 board: one binary, no --model (it
    downloads its head from the cloud), no --backend (auto); served, asked per sample over the
    local v2 API, against the x86-64 cloud-server, next to the native edge on ONNX Runtime."""
    pytest.importorskip("tritonclient.grpc")
    x, y = fashion_test_images(samples)
    log = "warn,classynet_runtime::engine=info"
    cloud = cloud_server(model)
    try:
        common = ["--server", cloud.addr, "--partition", TRACT_PARTITION, "--listen", "127.0.0.1:0", "--threads", "1",
                  "--cloud-timeout-ms", "60000"]
        arm = Server("edge-agent", arm_build["prefix"] + [str(arm_build["tract_edge"])] + common, clean_env(log),
                     timeout=START_TIMEOUT)
        try:
            arm_label, arm_exit, arm_s = ask(arm.addr, model.stem, x)
        finally:
            arm.stop()
        native = Server("edge-agent", [str(BIN / "edge-agent"), "--model", str(model), "--backend", "ort"] + common,
                        clean_env(log))
        try:
            nat_label, nat_exit, nat_s = ask(native.addr, model.stem, x)
        finally:
            native.stop()
    finally:
        cloud.stop()

    arm_engine, nat_engine = engine_line(arm.log()), engine_line(native.log())
    with capsys.disabled():
        print(f"\n{model.stem} at {TRACT_PARTITION}:")
        print(f"tract-only aarch64 edge under qemu: ready in {arm.start_s:.1f} s (head downloaded, compiled, warm), "
              f"{samples} samples in {arm_s:.1f} s; log: {arm_engine}")
        print(f"x86-64 edge (native, ONNX Runtime): ready in {native.start_s:.1f} s, {samples} samples in "
              f"{nat_s:.2f} s; log: {nat_engine}")
        print(f"answered at the edge (exits 1-2): {int((arm_exit < 2).sum())} (aarch64) / {int((nat_exit < 2).sum())} "
              f"(x86-64); accuracy {(arm_label == y).mean():.4f} / {(nat_label == y).mean():.4f}")

    assert arm_engine.startswith("inference engine tract"), f"the aarch64 edge did not log tract:\n{arm.log()[-3000:]}"
    # ... and not because an ONNX Runtime failed to load: this build has no other engine.
    assert "the only engine of this build" in arm_engine, arm_engine
    assert nat_engine.startswith("inference engine ort"), f"the native edge did not log ONNX Runtime:\n{native.log()[-3000:]}"
    for name, labels, exits in (("aarch64", arm_label, arm_exit), ("x86-64", nat_label, nat_exit)):
        assert len(labels) == len(exits) == samples
        assert (exits >= 0).all(), f"{name}: samples not answered: {np.flatnonzero(exits < 0).tolist()}"
        # Both paths are compared: samples leaving at the edge's exits and samples the cloud answers.
        assert (exits < 2).any() and (exits >= 2).any(), f"{name}: exits {np.bincount(exits).tolist()}"
    # Exactly the same answers. tract and ONNX Runtime may round the logits differently in the last
    # bits, so a sample whose confidence sat exactly on an exit's threshold could in principle leave
    # at another exit; none did (here: the first 2000 test images of the tiny model, all the same).
    # A failure lists the samples, to tell such a sample from a wrong answer.
    differ = np.flatnonzero((arm_label != nat_label) | (arm_exit != nat_exit))
    assert differ.size == 0, (
        f"the tract aarch64 edge and the ONNX Runtime x86-64 edge answered {differ.size} of {samples} samples "
        "differently (sample: aarch64 (label, exit) / x86-64 (label, exit)): "
        + ", ".join(f"{i}: ({arm_label[i]}, {arm_exit[i]}) / ({nat_label[i]}, {nat_exit[i]})" for i in differ[:10]))
