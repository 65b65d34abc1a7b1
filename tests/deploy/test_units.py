"""The deployment files against the real binaries.

scripts/install puts binaries, units, env files, the policy and the zoo model into a temporary
prefix (it rewrites the units' and env files' absolute paths to point there), scripts/dev-certs
makes the TLS files there, and then:

* `systemd-analyze verify` checks both units (with their memory drop-in);
* each unit's ExecStart runs the way systemd would run it: the environment of its
  Environment= lines and its EnvironmentFile (the shipped example, untouched but for the ports,
  which must be free, and the edge's cloud address), its credentials (LoadCredential=) in a
  credentials directory, and a NOTIFY_SOCKET this test listens on. Each must send READY=1 from
  its main process, answer a health check over mutual TLS and serve /metrics, then on SIGTERM
  send STOPPING=1 and exit 0 within the unit's TimeoutStopSec.

The binaries come from CLASSYNET_BIN_DIR (default target/debug). Every subprocess has a timeout
and is killed in a finally.
"""
from __future__ import annotations

import array
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # the refused handshake of the mutual-TLS check is expected

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug")).resolve()
UNITS = ("cloud-server", "edge-agent")

# Output lines of `systemd-analyze verify` that mention a unit but are not about our files.
# None is known on systemd 252 (Debian 12): the list stays empty until one is met and explained
# here. (Lines about other units, e.g. a distribution's own, are ignored anyway.)
HARMLESS_VERIFY_LINES: list[re.Pattern[str]] = []


# --- Installing ----------------------------------------------------------------------------------


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def prefix():
    for b in UNITS:
        if not (BIN / b).is_file():
            pytest.fail(f"{BIN / b} is not built (cargo build -p edge-agent -p cloud-server, or set CLASSYNET_BIN_DIR)")
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing (Debian: apt-get install openssl); scripts/dev-certs needs it")
    # Not pytest's tmp_path: the prefix holds copies of both binaries (hundreds of MB in debug),
    # which pytest would keep for three runs.
    p = Path(tempfile.mkdtemp(prefix="classynet-prefix-"))
    try:
        r = run([str(ROOT / "scripts" / "install"), "--prefix", str(p), "--bin-dir", str(BIN)], timeout=300, cwd=ROOT)
        assert r.returncode == 0, f"scripts/install failed:\n{r.stdout}\n{r.stderr}"
        r = run([str(ROOT / "scripts" / "dev-certs"), str(p / "etc" / "classynet" / "tls")], timeout=120, cwd=ROOT)
        assert r.returncode == 0, f"scripts/dev-certs failed:\n{r.stdout}\n{r.stderr}"
        yield p
    finally:
        shutil.rmtree(p, ignore_errors=True)


def unit_path(prefix: Path, name: str) -> Path:
    return prefix / "etc" / "systemd" / "system" / f"{name}.service"


def test_install_lays_out_a_self_contained_tree(prefix):
    for rel in ("usr/local/bin/edge-agent", "usr/local/bin/cloud-server", "etc/classynet/policy.toml",
                "etc/classynet/edge-agent.env", "etc/classynet/cloud-server.env",
                "usr/local/share/classynet/models/resnet110-7exit-cnc.onnx",
                "etc/systemd/system/edge-agent.service.d/memory.conf"):
        assert (prefix / rel).exists(), rel
    assert list((prefix / "usr/local/lib/classynet").glob("libonnxruntime.so.*"))
    for name in UNITS:
        text = unit_path(prefix, name).read_text()
        # Every absolute path of the layout points into the prefix.
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            for m in re.finditer(r"(?<![\w/])(/usr/local/\S*|/etc/classynet\S*)", line):
                pytest.fail(f"{name}.service: {m.group(1)} was not moved into the prefix: {line}")
        assert f"ExecStart={prefix}/usr/local/bin/{name}" in text
        env = parse_env_file(prefix / "etc" / "classynet" / f"{name}.env")
        for k, v in env.items():
            if v.startswith("/"):
                assert v.startswith(str(prefix)), f"{name}.env: {k}={v} is outside the prefix"
    mode = (prefix / "etc/classynet/edge-agent.env").stat().st_mode & 0o777
    assert mode == 0o600, f"the env files may hold a token: mode {mode:o}"
    for key in ("edge", "cloud", "ca"):
        assert (prefix / "etc/classynet/tls" / f"{key}.key").stat().st_mode & 0o077 == 0


def test_install_is_idempotent_and_keeps_the_administrators_files(prefix):
    env = prefix / "etc" / "classynet" / "cloud-server.env"
    mine = env.read_text() + "\n# edited by the administrator\n"
    env.write_text(mine)
    r = run([str(ROOT / "scripts" / "install"), "--prefix", str(prefix), "--bin-dir", str(BIN)], timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert env.read_text() == mine
    assert f"kept {env}" in r.stdout
    assert "installed " not in r.stdout, f"a second run changed files:\n{r.stdout}"

    memory = prefix / "etc/systemd/system/edge-agent.service.d/memory.conf"
    r = run([str(ROOT / "scripts" / "install"), "--prefix", str(prefix), "--bin-dir", str(BIN),
             "--edge-memory-budget", "20MB"], timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    limit = int(re.search(r"^MemoryMax=(\d+)M$", memory.read_text(), re.M).group(1))
    baseline = int(re.search(r"^EDGE_BASELINE_MIB=(\d+)$", (ROOT / "scripts/install").read_text(), re.M).group(1))
    assert limit == -(-20_000_000 // 2**20) + baseline  # ceil(20 MB in MiB) + baseline
    assert "EDGE_AGENT_MEMORY_BUDGET" in r.stdout  # the kept env file's budget differs: it says so
    # Without the flag the chosen limit stays.
    r = run([str(ROOT / "scripts" / "install"), "--prefix", str(prefix), "--bin-dir", str(BIN)], timeout=300, cwd=ROOT)
    assert r.returncode == 0 and f"MemoryMax={limit}M" in memory.read_text()

    bad = run([str(ROOT / "scripts" / "install"), "--prefix", str(prefix), "--bin-dir", str(prefix / "nowhere")],
              timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "missing" in bad.stderr
    bad = run([str(ROOT / "scripts" / "install"), "--prefix", str(prefix), "--bin-dir", str(BIN),
               "--edge-memory-budget", "lots"], timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "--edge-memory-budget" in bad.stderr


def test_a_tract_only_edge_installs_without_onnx_runtime():
    # The JetPack 4.6 path (docs/jetson.md): nothing of ONNX Runtime is installed or referenced.
    # Not tmp_path, which pytest keeps: the prefix holds a copy of the binary.
    p = Path(tempfile.mkdtemp(prefix="classynet-tract-prefix-"))
    try:
        check_tract_only_install(p)
    finally:
        shutil.rmtree(p, ignore_errors=True)


def check_tract_only_install(p: Path) -> None:
    r = run([str(ROOT / "scripts" / "install"), "--prefix", str(p), "--bin-dir", str(BIN), "--only", "edge-agent",
             "--tract-only", "--edge-memory-budget", "470kB"], timeout=300, cwd=ROOT)
    assert r.returncode == 0, f"scripts/install failed:\n{r.stdout}\n{r.stderr}"
    assert (p / "usr/local/bin/edge-agent").is_file()
    assert not (p / "usr/local/bin/cloud-server").exists()
    assert not list(p.rglob("libonnxruntime*")), "no ONNX Runtime library in a tract-only install"
    env = parse_env_file(p / "etc/classynet/edge-agent.env")
    assert env.get("EDGE_AGENT_BACKEND") == "tract", env
    assert "EDGE_AGENT_ORT_LIB" not in env, env
    # MemoryMax takes tract's baseline.
    script = (ROOT / "scripts/install").read_text()
    tract = int(re.search(r"^EDGE_BASELINE_MIB_TRACT=(\d+)$", script, re.M).group(1))
    memory = (p / "etc/systemd/system/edge-agent.service.d/memory.conf").read_text()
    assert f"MemoryMax={-(-470_000 // 2**20) + tract}M" in memory, memory
    # The debug binaries have both engines: the script says what that means.
    assert "ONNX Runtime support built in" in r.stdout, r.stdout
    bad = run([str(ROOT / "scripts" / "install"), "--prefix", str(p), "--bin-dir", str(BIN), "--tract-only",
               "--ort-lib", "/nowhere/libonnxruntime.so"], timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "--tract-only installs no ONNX Runtime library" in bad.stderr, bad.stderr


def test_dev_certs_verify_and_are_kept(prefix):
    tls = prefix / "etc" / "classynet" / "tls"
    r = run(["openssl", "verify", "-CAfile", str(tls / "ca.pem"), str(tls / "cloud.pem"), str(tls / "edge.pem")], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    r = run([str(ROOT / "scripts" / "dev-certs"), str(tls)], timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before, "a second run changed the certificates"
    text = run(["openssl", "x509", "-in", str(tls / "edge.pem"), "-noout", "-text"], timeout=30).stdout
    assert "TLS Web Client Authentication" in text and "TLS Web Server Authentication" in text
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    assert "BEGIN PRIVATE KEY" in (tls / "edge.key").read_text()  # PKCS#8


# --- systemd-analyze verify ----------------------------------------------------------------------


def test_systemd_analyze_verifies_both_units(prefix, tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    unit_dir = prefix / "etc" / "systemd" / "system"
    # The trailing ':' keeps the built-in search path (network-online.target, ...) after ours,
    # so the units and their drop-ins (edge-agent.service.d/memory.conf) load from the prefix.
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_dir}:", SYSTEMD_LOG_COLOR="0")
    r = run([tool, "verify", *(f"{u}.service" for u in UNITS)], timeout=120, env=env, cwd=tmp_path)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    bad = [ln for ln in lines
           if any(u in ln for u in UNITS) and not any(p.search(ln) for p in HARMLESS_VERIFY_LINES)]
    assert r.returncode == 0 and not bad, "systemd-analyze verify:\n" + "\n".join(lines)


# --- Units and env files, read ------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[str]]:
    """The [Service] and [Unit] settings of a unit file plus its drop-ins: key -> values in order."""
    out: dict[str, list[str]] = {}
    files = [path, *sorted(path.with_name(path.name + ".d").glob("*.conf"))]
    for f in files:
        section = None
        pending = ""
        for raw in f.read_text().splitlines():
            line = pending + raw.strip()
            pending = ""
            if not line or line[0] in "#;":
                continue
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(f"Service.{key}") or unit.get(f"Unit.{key}")
    assert values, f"the unit has no {key}="
    return values[-1]


def parse_env_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= format: KEY=VALUE lines, # or ; comments, optional quotes."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()), f"{path}: not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def seconds(text: str) -> float:
    """A systemd time span such as 30, 30s, 2min, 1min 30s."""
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)\s*([a-z]*)", text):
        total += float(num) * {"": 1, "s": 1, "sec": 1, "ms": 0.001, "m": 60, "min": 60, "h": 3600}[unit]
    return total


def help_env_vars(binary: Path) -> set[str]:
    r = run([str(binary), "--help"], timeout=60)
    assert r.returncode == 0, r.stderr
    # `[env: NAME=value]`, or `[env: NAME]` for a flag whose value --help hides (the API token).
    return set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", r.stdout))


@pytest.mark.parametrize("name", UNITS)
def test_units_and_env_files_agree_with_the_binaries(name):
    unit = parse_unit(ROOT / "deploy" / "systemd" / f"{name}.service")
    assert one(unit, "Type") == "notify" and one(unit, "NotifyAccess") == "main"
    assert one(unit, "Restart") == "on-failure"
    for key, want in {"DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                      "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                      "AmbientCapabilities": "", "PrivateDevices": "yes", "MemoryDenyWriteExecute": "yes",
                      "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "LockPersonality": "yes",
                      "RestrictNamespaces": "yes", "ProtectKernelTunables": "yes",
                      "ProtectKernelModules": "yes", "ProtectControlGroups": "yes"}.items():
        assert one(unit, key) == want, f"{name}.service: {key}={one(unit, key)}, expected {want!r}"
    assert "@system-service" in unit["Service.SystemCallFilter"]

    example = ROOT / "deploy" / "env" / f"{name}.env"
    env = parse_env_file(example)
    prefix = name.upper().replace("-", "_") + "_"
    # TimeoutStopSec must outlast the drain deadline, or systemd kills a draining service.
    assert seconds(one(unit, "TimeoutStopSec")) >= int(env.get(f"{prefix}SHUTDOWN_TIMEOUT_S", "10")) + 10
    # Every flag is in the example, set or commented; nothing there is unknown to the binary.
    mentioned = set(re.findall(rf"^#?\s*({prefix}[A-Z0-9_]+)=", example.read_text(), re.M))
    flags = help_env_vars(BIN / name)
    assert flags - mentioned == set(), f"{example.name} lacks flags of {name} --help"
    assert mentioned - flags == set(), f"{example.name} names variables {name} --help does not know"


# --- Running the units like systemd -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Notify:
    """The NOTIFY_SOCKET end of systemd: collects READY=1/STOPPING=1 with the sender's pid."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int | None, dict[str, str]]] = []

    def poll(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:12])[0]
            fields = dict(ln.split("=", 1) for ln in data.decode(errors="replace").splitlines() if "=" in ln)
            self.messages.append((pid, fields))
            end = min(end, time.monotonic() + 0.2)  # drain what is queued, then return

    def wait_for(self, key: str, timeout: float, alive=lambda: True) -> tuple[int | None, dict[str, str]] | None:
        end = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if m[1].get(key) == "1":
                    return m
            left = end - time.monotonic()
            if left <= 0 or not alive():
                self.poll(0.1)
                return next((m for m in self.messages if m[1].get(key) == "1"), None)
            self.poll(min(left, 0.5))

    def close(self) -> None:
        self.sock.close()


class Service:
    """One unit's ExecStart, started with the environment systemd would give it."""

    def __init__(self, prefix: Path, name: str, work: Path, overrides: dict[str, str]):
        self.name = name
        self.unit = parse_unit(unit_path(prefix, name))
        self.work = work / name
        self.work.mkdir()
        # Credentials: systemd copies each LoadCredential= source into a private directory.
        creds = self.work / "credentials"
        creds.mkdir(mode=0o700)
        for spec in self.unit.get("Service.LoadCredential", []):
            if not spec:
                continue
            cred, _, src = spec.partition(":")
            shutil.copyfile(src, creds / cred)
            (creds / cred).chmod(0o400)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "CREDENTIALS_DIRECTORY": str(creds)}
        for line in self.unit.get("Service.Environment", []):
            for item in shlex.split(line):
                k, _, v = item.partition("=")
                env[k] = v.replace("%d", str(creds)).replace("%%", "%")
        for f in self.unit.get("Service.EnvironmentFile", []):
            optional = f.startswith("-")
            path = Path(f.lstrip("-"))
            if path.exists() or not optional:
                env.update(parse_env_file(path))  # EnvironmentFile= wins over Environment=
        for line in self.unit.get("Service.UnsetEnvironment", []):
            for k in shlex.split(line):
                env.pop(k.partition("=")[0], None)
        env.update(overrides)
        self.env = env
        self.argv = shlex.split(one(self.unit, "ExecStart"))
        self.start_timeout = min(seconds(one(self.unit, "TimeoutStartSec")), 300)
        self.stop_timeout = seconds(one(self.unit, "TimeoutStopSec"))
        self.notify = Notify(Path(tempfile.mkdtemp(prefix="cn-notify-")))  # short: sun_path is 108 bytes
        env["NOTIFY_SOCKET"] = self.notify.path
        self.proc: subprocess.Popen | None = None
        self.stdout: list[str] = []
        self.stderr_path = self.work / "stderr.log"

    def start(self) -> None:
        with open(self.stderr_path, "w") as err:
            # systemd runs system services in / with stdin from /dev/null.
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd="/", stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line.rstrip("\n"))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def listening(self, timeout: float) -> str | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.stdout:
                m = re.search(r"listening on (\S+)", line)
                if m:
                    return m.group(1)
            if not self.alive():
                time.sleep(0.2)  # let the reader catch the last lines
                if not any("listening on" in ln for ln in self.stdout):
                    return None
            time.sleep(0.05)
        return None

    def log(self) -> str:
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"--- {self.name} stdout\n" + "\n".join(self.stdout) + f"\n--- {self.name} stderr (last 3000 chars)\n{err[-3000:]}"

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.notify.close()
        shutil.rmtree(Path(self.notify.path).parent, ignore_errors=True)


def ready_check(svc: Service, problems: list[str]) -> str | None:
    """READY=1 from the main pid, and the listening address (None: the service did not start)."""
    addr = svc.listening(svc.start_timeout)
    if addr is None:
        problems.append(f"{svc.name} did not start (exit {svc.proc.poll()})\n{svc.log()}")
        return None
    # READY=1 comes once the model is loaded and warm; allow for a service that prints its address
    # first, but not for one that never sends it (that one would hang `systemctl start`).
    msg = svc.notify.wait_for("READY", 15, svc.alive)
    if msg is None:
        problems.append(f"{svc.name}: no READY=1 on NOTIFY_SOCKET (Type=notify would time out after "
                        f"{svc.start_timeout:.0f} s)")
    elif msg[0] is not None and msg[0] != svc.proc.pid:
        problems.append(f"{svc.name}: READY=1 came from pid {msg[0]}, not the main pid {svc.proc.pid} "
                        "(NotifyAccess=main drops it)")
    return addr


def grpc_ready(addr: str, tls: Path, client_cert: bool, headers: dict[str, str] | None = None) -> bool:
    import tritonclient.grpc as grpcclient

    kw = dict(ssl=True, root_certificates=str(tls / "ca.pem"))
    if client_cert:
        kw.update(private_key=str(tls / "edge.key"), certificate_chain=str(tls / "edge.pem"))
    client = grpcclient.InferenceServerClient(url=addr, **kw)
    try:
        return bool(client.is_server_ready(headers=headers, client_timeout=10))
    finally:
        client.close()


def split_check(addr: str, tls: Path, headers: dict[str, str] | None, problems: list[str]) -> None:
    """Samples through the edge reach the cloud over mutual TLS: answered, not degraded, under
    the cloud's policy (version 1 in deploy/policy.toml, pushed over the Control stream)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=addr, ssl=True, root_certificates=str(tls / "ca.pem"),
                                              private_key=str(tls / "edge.key"),
                                              certificate_chain=str(tls / "edge.pem"))
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    last = "no answer"
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                r = client.infer("resnet110-7exit-cnc", [inp], headers=headers, client_timeout=30)
            except Exception as e:  # noqa: BLE001
                last = f"ModelInfer failed: {e}"
                time.sleep(0.5)
                continue
            params = r.get_response().parameters
            exits = r.as_numpy("exit").reshape(-1)
            version = params["classynet_policy_version"].int64_param if "classynet_policy_version" in params else None
            degraded = "classynet_degraded" in params
            last = (f"policy version {version}, exits {exits.tolist()}, degraded samples: "
                    f"{params['classynet_degraded'].string_param if degraded else 'none'}")
            # Noise reaches the last exit, E7 (index 6), which the default budget leaves to the cloud.
            if version == 1 and not degraded and (exits == 6).any():
                print(f"edge-agent: split request answered ({last})")
                return
            time.sleep(0.5)
        problems.append(f"edge-agent: samples did not reach the cloud under its policy within 20 s ({last})")
    finally:
        client.close()


def metrics_check(svc: Service, var: str, problems: list[str]) -> None:
    addr = svc.env.get(var)
    if not addr:
        return
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            body = r.read().decode(errors="replace")
            if r.status != 200:
                problems.append(f"{svc.name}: GET /metrics answered {r.status}")
            elif body and "# TYPE" not in body:
                problems.append(f"{svc.name}: /metrics is not Prometheus text: {body[:200]!r}")
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        problems.append(f"{svc.name}: GET http://{addr}/metrics failed: {e}")


def stop_check(svc: Service, problems: list[str]) -> None:
    """SIGTERM (systemd's KillSignal=): STOPPING=1, then exit 0 within TimeoutStopSec."""
    if not svc.alive():
        problems.append(f"{svc.name} exited before SIGTERM (status {svc.proc.poll()})\n{svc.log()}")
        return
    t0 = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    try:
        code = svc.proc.wait(timeout=svc.stop_timeout)
    except subprocess.TimeoutExpired:
        problems.append(f"{svc.name} still running {svc.stop_timeout:.0f} s after SIGTERM (systemd would SIGKILL)")
        return
    took = time.monotonic() - t0
    if code != 0:
        problems.append(f"{svc.name} exited with status {code} after SIGTERM (systemd counts a failure)\n{svc.log()}")
    if svc.notify.wait_for("STOPPING", 1.0) is None:
        problems.append(f"{svc.name}: no STOPPING=1 on NOTIFY_SOCKET after SIGTERM")
    print(f"{svc.name}: stopped in {took:.2f} s")


def test_units_start_notify_serve_over_mutual_tls_and_stop(prefix, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    tls = prefix / "etc" / "classynet" / "tls"
    problems: list[str] = []
    cloud = Service(prefix, "cloud-server", tmp_path, {
        "CLOUD_SERVER_LISTEN": "127.0.0.1:0",
        "CLOUD_SERVER_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    })
    edge = None
    try:
        cloud.start()
        cloud_addr = ready_check(cloud, problems)
        assert cloud_addr, "\n\n".join(problems)
        try:
            if not grpc_ready(cloud_addr, tls, client_cert=True):
                problems.append("cloud-server: is_server_ready() is false")
        except Exception as e:  # noqa: BLE001
            problems.append(f"cloud-server: health check over mutual TLS failed: {e}")
        # Mutual TLS: a client without a certificate from the CA does not get in.
        try:
            grpc_ready(cloud_addr, tls, client_cert=False)
            problems.append("cloud-server answered a TLS client without a client certificate (no mutual TLS)")
        except Exception:  # noqa: BLE001 - refused, as it should be
            pass
        metrics_check(cloud, "CLOUD_SERVER_METRICS_LISTEN", problems)

        port = cloud_addr.rsplit(":", 1)[1]
        edge = Service(prefix, "edge-agent", tmp_path, {
            "EDGE_AGENT_SERVER": f"127.0.0.1:{port}",
            "EDGE_AGENT_LISTEN": "127.0.0.1:0",
            "EDGE_AGENT_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        })
        edge.start()
        edge_addr = ready_check(edge, problems)
        if edge_addr:
            token = edge.env.get("EDGE_AGENT_API_TOKEN")
            headers = {"authorization": f"Bearer {token}"} if token else None
            try:
                if not grpc_ready(edge_addr, tls, client_cert=True, headers=headers):
                    problems.append("edge-agent: is_server_ready() is false")
            except Exception as e:  # noqa: BLE001
                problems.append(f"edge-agent: health check over TLS failed: {e}")
            split_check(edge_addr, tls, headers, problems)
            metrics_check(edge, "EDGE_AGENT_METRICS_LISTEN", problems)
            # systemd stops the edge first (it is ordered After=cloud-server.service).
            stop_check(edge, problems)
        stop_check(cloud, problems)
    finally:
        for svc in (edge, cloud):
            if svc is not None:
                svc.kill()
    assert not problems, "\n\n".join(problems)
