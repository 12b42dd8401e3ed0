"""The structural checks of scripts/check-deploy, on rendered manifests and the
compose file. Each subcommand prints what it found and exits non-zero on a
violation. Needs PyYAML (the check's virtualenv has it).

  check_deploy.py restricted FILE...     every pod meets the restricted Pod Security profile
  check_deploy.py palaver FILE...        palaver's own rules (probes, replicas, PDBs, ...)
  check_deploy.py metrics ROOT           alert and dashboard metrics exist in the code
  check_deploy.py compose FILE           compose rules (healthchecks, no $share, ...)
  check_deploy.py envvars ROOT FILE...   every PALAVER_* variable set is one the code reads
"""

import json
import re
import sys
from pathlib import Path

import yaml

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Volume types the restricted profile allows.
ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
PALAVER = {"palaver-gateway", "palaver-session", "palaver-inference"}


def load(paths):
    docs = []
    for p in paths:
        docs += [d for d in yaml.safe_load_all(Path(p).read_text()) if d]
    return docs


def pod_specs(docs):
    for d in docs:
        if d.get("kind") in POD_KINDS:
            yield d, d["spec"]["template"]["spec"]
        elif d.get("kind") == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif d.get("kind") == "Pod":
            yield d, d["spec"]


def name(d):
    return f'{d["kind"]}/{d["metadata"]["name"]}'


def restricted(paths):
    """The checks of the restricted Pod Security Standard, one by one."""
    errors, pods = [], 0
    for d, spec in pod_specs(load(paths)):
        pods += 1
        where = name(d)
        psc = spec.get("securityContext") or {}
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(host):
                errors.append(f"{where}: {host}")
        for v in spec.get("volumes") or []:
            kinds = set(v) - {"name"}
            if not kinds <= ALLOWED_VOLUMES:
                errors.append(f"{where}: volume {v['name']} of type {sorted(kinds)}")
        containers = (spec.get("initContainers") or []) + spec["containers"]
        for c in containers:
            csc = c.get("securityContext") or {}
            at = f"{where} container {c['name']}"
            non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            if non_root is not True:
                errors.append(f"{at}: runAsNonRoot is not true")
            uid = csc.get("runAsUser", psc.get("runAsUser"))
            if not isinstance(uid, int) or uid == 0:
                errors.append(f"{at}: runAsUser {uid!r} is not a numeric non-root uid")
            seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                errors.append(f"{at}: seccompProfile {seccomp!r}")
            if csc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{at}: allowPrivilegeEscalation is not false")
            if csc.get("privileged"):
                errors.append(f"{at}: privileged")
            caps = csc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                errors.append(f"{at}: capabilities do not drop ALL")
            if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                errors.append(f"{at}: adds capabilities {caps['add']}")
            # Beyond the profile, palaver's own rule: nothing writes its image.
            if csc.get("readOnlyRootFilesystem") is not True:
                errors.append(f"{at}: readOnlyRootFilesystem is not true")
            for port in c.get("ports") or []:
                if port.get("hostPort"):
                    errors.append(f"{at}: hostPort {port['hostPort']}")
    report("restricted Pod Security", errors, f"{pods} pod templates")


def palaver(paths):
    """What the design and issue 21 ask of palaver's own objects."""
    docs = load(paths)
    errors = []
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for n in PALAVER:
        d = deployments.get(n)
        if d is None:
            errors.append(f"no Deployment {n}")
            continue
        c = d["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe not in c:
                errors.append(f"{n}: no {probe}")
        if not (c.get("resources") or {}).get("limits", {}).get("memory"):
            errors.append(f"{n}: no memory limit")
        image = c.get("image", "")
        if image.endswith(":latest") and "dev" not in d["metadata"].get("namespace", ""):
            errors.append(f"{n}: image {image} outside dev")
    for d in deployments.values():
        for c in d["spec"]["template"]["spec"]["containers"]:
            if "readinessProbe" not in c or "livenessProbe" not in c:
                errors.append(f"{name(d)} container {c['name']}: missing a probe")
            for e in c.get("env") or []:
                if e["name"] == "PALAVER_SHARED_GROUP":
                    errors.append(f"{name(d)}: PALAVER_SHARED_GROUP reorders a session's messages")
    for d in docs:
        if d["kind"] == "ConfigMap" and "PALAVER_SHARED_GROUP" in (d.get("data") or {}):
            errors.append(f"{name(d)}: PALAVER_SHARED_GROUP reorders a session's messages")
        if d["kind"] == "ConfigMap":
            for k, v in (d.get("data") or {}).items():
                if re.search(r"(?i)password|token|secret|api.?key", k) or re.search(r"redis://[^@/]*:[^@/]+@", str(v)):
                    errors.append(f"{name(d)}: {k} looks like a secret in a ConfigMap")
    gw = deployments.get("palaver-gateway")
    if gw and gw["spec"].get("replicas") != 2:
        errors.append("palaver-gateway: replicas must be 2 (one active, one hot standby)")
    inf = deployments.get("palaver-inference")
    if inf and inf["spec"].get("strategy", {}).get("type") != "Recreate":
        errors.append("palaver-inference: strategy must be Recreate (never 16 generations on one GPU)")
    if inf and inf["spec"].get("replicas") != 1:
        errors.append("palaver-inference: one replica per model server")
    hpas = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    if hpas != {"palaver-session"}:
        errors.append(f"autoscaled: {sorted(hpas)}, expected session-svc only")
    pdb = by.get(("PodDisruptionBudget", "palaver-gateway"))
    if not pdb or pdb["spec"].get("minAvailable") != 1:
        errors.append("palaver-gateway: PodDisruptionBudget minAvailable 1 missing")
    if ("PodDisruptionBudget", "palaver-session") not in by:
        errors.append("palaver-session: no PodDisruptionBudget")
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    allowed = lambda p: [
        (peer.get("podSelector") or {}).get("matchLabels", {}).get("app.kubernetes.io/name")
        or json.dumps(peer, sort_keys=True)
        for rule in p["spec"].get("ingress", [])
        for peer in rule.get("from", [])
        if any(port.get("port") in (50051, 50052) for port in rule.get("ports", []))
    ]
    s = policies.get("palaver-session")
    if not s or sorted(allowed(s)) != sorted(["palaver-gateway", json.dumps({"podSelector": {"matchLabels": {"palaver.io/admin-tool": "true"}}}, sort_keys=True)]):
        errors.append(f"NetworkPolicy palaver-session: gRPC from {allowed(s) if s else None}")
    i = policies.get("palaver-inference")
    if not i or allowed(i) != ["palaver-session"]:
        errors.append(f"NetworkPolicy palaver-inference: gRPC from {allowed(i) if i else None}")
    secrets = [d for d in docs if d["kind"] == "Secret"]
    for d in secrets:
        if not re.search(r"-[a-z0-9]{10}$", d["metadata"]["name"]):
            errors.append(f"{name(d)}: a Secret not from a generator")
    report("palaver's rules", errors, f"{len(deployments)} Deployments, {len(secrets)} generated Secrets")


def metrics(root):
    """Every metric an alert or a dashboard panel names is exported by the code."""
    root = Path(root)
    code = "\n".join(p.read_text() for p in root.glob("*/src/metrics.rs"))
    # session-svc registers under the prefix "palaver_session" with units.
    def exported(metric):
        base = re.sub(r"_(bucket|sum|count|total)$", "", metric)
        if f'"{base}"' in code:
            return True
        if base.startswith("palaver_session_"):
            rest = base[len("palaver_session_"):]
            rest = re.sub(r"_seconds$", "", rest)
            return f'"{rest}"' in code
        return False
    mon = root / "deploy/k8s/components/monitoring"
    texts = {p.name: p.read_text() for p in (mon / "prometheusrule.yaml", mon / "palaver-dashboard.json")}
    json.loads(texts["palaver-dashboard.json"])
    errors, seen = [], set()
    for file, text in texts.items():
        for m in sorted(set(re.findall(r"\bpalaver_[a-z_]+", text))):
            seen.add(m)
            if not exported(m):
                errors.append(f"{file}: {m} is not exported by any service")
    report("alert and dashboard metrics", errors, f"{len(seen)} metric names")


def compose(path):
    doc = yaml.safe_load(Path(path).read_text())
    errors = []
    if "name" in doc:
        errors.append("top-level name: docker-compose 1.29 rejects it")
    for svc, spec in doc["services"].items():
        if "healthcheck" not in spec:
            errors.append(f"{svc}: no healthcheck")
        env = spec.get("environment") or {}
        if "PALAVER_SHARED_GROUP" in env:
            errors.append(f"{svc}: PALAVER_SHARED_GROUP reorders a session's messages")
    vllm = doc["services"].get("vllm", {})
    if ":latest" in vllm.get("image", ":latest"):
        errors.append("vllm: image not pinned")
    if vllm.get("ipc") != "host":
        errors.append("vllm: ipc is not host")
    devices = vllm.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not devices or devices[0].get("count") != 1:
        errors.append("vllm: not exactly one GPU")
    report("compose rules", errors, f"{len(doc['services'])} services")


# Set by the manifests ahead of the code that reads them (none now).
PENDING_ENV: set = set()


def envvars(root, paths):
    """clap ignores an environment variable it does not know: a misspelt one
    would silently leave the default in force, so each must exist in the code."""
    root = Path(root)
    code = "\n".join(p.read_text() for p in root.glob("*/src/**/*.rs"))
    known = set(re.findall(r'env\s*=\s*"(PALAVER_[A-Z0-9_]+)"', code))
    known |= set(re.findall(r'"(PALAVER_[A-Z0-9_]+)"', code))
    used = set()
    for p in paths:
        used |= set(re.findall(r"\b(PALAVER_[A-Z0-9_]+)(?=\s*[:=]|\b)", Path(p).read_text()))
    # The compose file's own settings (interpolated by compose, not read by palaver).
    used -= {"PALAVER_MQTT_PORT", "PALAVER_MODEL", "PALAVER_IMAGE", "PALAVER_SESSION_PORT"}
    errors = [f"{v} is set but no palaver binary reads it" for v in sorted(used - known - PENDING_ENV)]
    pending = sorted(used & PENDING_ENV - known)
    if pending:
        print(f"  set ahead of the code (issue 20): {', '.join(pending)}")
    report("environment variables", errors, f"{len(used)} PALAVER_* names")


def report(what, errors, scope):
    for e in errors:
        print(f"  FAIL {e}")
    if errors:
        print(f"{what}: {len(errors)} problems in {scope}")
        sys.exit(1)
    print(f"{what}: ok ({scope})")


if __name__ == "__main__":
    commands = {
        "restricted": lambda args: restricted(args),
        "palaver": lambda args: palaver(args),
        "metrics": lambda args: metrics(args[0]),
        "compose": lambda args: compose(args[0]),
        "envvars": lambda args: envvars(args[0], args[1:]),
    }
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        print(__doc__)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])
