"""The structural checks of scripts/check-deploy, on rendered manifests and the
compose file. Each subcommand prints what it found and exits non-zero on a
violation. Needs PyYAML (the check's virtualenv has it).

  check_deploy.py restricted FILE...     every pod meets the restricted Pod Security profile
  check_deploy.py palaver FILE...        palaver's own rules (probes, replicas, PDBs, ...)
  check_deploy.py metrics ROOT           alert and dashboard metrics exist in the code
  check_deploy.py compose FILE           compose rules (healthchecks, no $share, ...)
  check_deploy.py envvars ROOT FILE...   every PALAVER_* variable set is one the code reads
  check_deploy.py seeded FILE            the one-vLLM-per-GPU rules catch seeded violations
                                         of the rendered gpu overlay FILE
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
    # Workloads: palaver-inference is a StatefulSet, the others Deployments.
    workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for n in PALAVER:
        kind = "StatefulSet" if n == "palaver-inference" else "Deployment"
        d = workloads.get(n)
        if d is None or d["kind"] != kind:
            errors.append(f"no {kind} {n}")
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
    for d in workloads.values():
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
    inf = workloads.get("palaver-inference")
    if inf and inf["kind"] == "StatefulSet":
        errors += inference_pairs(inf, docs)
    # No model server outside the inference pods: a vLLM of its own
    # Deployment (or any other workload) would be shared by several
    # inference-svc, with 8 × N generations on one GPU.
    for d, spec in pod_specs(docs):
        if d is inf:
            continue
        for c in (spec.get("initContainers") or []) + spec["containers"]:
            if "vllm" in c.get("image", "") or gpus(c):
                errors.append(f"{name(d)} container {c['name']}: a model server or GPU outside palaver-inference")
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
    report("palaver's rules", errors, f"{len(deployments)} Deployments, {len(workloads) - len(deployments)} StatefulSets, {len(secrets)} generated Secrets")


def gpus(c):
    res = c.get("resources") or {}
    return {k: (res.get(k) or {}).get("nvidia.com/gpu") for k in ("requests", "limits") if (res.get(k) or {}).get("nvidia.com/gpu") is not None}


def inference_pairs(inf, docs):
    """One inference-svc per model server: issue 24's pairs."""
    errors = []
    spec = inf["spec"]
    pod = spec["template"]["spec"]
    n = "StatefulSet/palaver-inference"
    if spec.get("serviceName") != "palaver-inference":
        errors.append(f"{n}: serviceName is not the headless Service palaver-inference")
    svc = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "palaver-inference"), None)
    if not svc or svc["spec"].get("clusterIP") != "None":
        errors.append("Service palaver-inference: not headless (session-svc resolves every pod)")
    if (spec.get("updateStrategy") or {}).get("type", "RollingUpdate") != "RollingUpdate" or \
            ((spec.get("updateStrategy") or {}).get("rollingUpdate") or {}).get("maxUnavailable", 1) != 1:
        errors.append(f"{n}: updates must replace one pod at a time")
    if not isinstance(spec.get("replicas"), int) or spec["replicas"] < 1:
        errors.append(f"{n}: replicas {spec.get('replicas')!r}")
    containers = {c["name"]: c for c in pod["containers"]}
    inference = containers.get("inference")
    if inference is None:
        return errors + [f"{n}: no container inference"]
    env = {e["name"]: e.get("value") for e in inference.get("env") or []}
    for ref in inference.get("envFrom") or []:
        cm = (ref.get("configMapRef") or {}).get("name")
        env.update(next((d.get("data") or {} for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm), {}))
    backend = env.get("PALAVER_INFERENCE_BACKEND", "sim")
    vllms = [c for c in (pod.get("initContainers") or []) + pod["containers"] if "vllm" in c.get("image", "")]
    if backend == "sim":
        if vllms or any(gpus(c) for c in pod["containers"]):
            errors.append(f"{n}: the simulator with a model server or GPU in the pod")
        return errors
    if len(vllms) != 1 or vllms[0]["name"] != "vllm" or "vllm" not in containers:
        return errors + [f"{n}: {len(vllms)} vLLM containers, expected one container vllm per pod"]
    vllm = vllms[0]
    if vllm["image"].endswith(":latest") or ":" not in vllm["image"].rsplit("/", 1)[-1]:
        errors.append(f"{n}: vLLM image {vllm['image']} not pinned")
    if gpus(vllm) != {"requests": 1, "limits": 1} and gpus(vllm) != {"limits": 1}:
        errors.append(f"{n}: container vllm asks for GPUs {gpus(vllm)}, expected exactly one")
    for c in pod["containers"]:
        if c is not vllm and gpus(c):
            errors.append(f"{n}: container {c['name']} asks for GPUs {gpus(c)}")
    url = env.get("PALAVER_INFERENCE_VLLM_URL") or ""
    if not re.fullmatch(r"http://(127\.0\.0\.1|localhost|\[::1\]):8000(/v1)?/?", url):
        errors.append(f"{n}: PALAVER_INFERENCE_VLLM_URL {url!r} is not the pod's own vLLM (http://127.0.0.1:8000)")
    probe = (inference.get("readinessProbe") or {}).get("grpc") or {}
    if probe.get("service") != "palaver.inference.v1.Inference":
        errors.append(f"{n}: inference's readiness does not ask palaver.inference.v1.Inference (vLLM's health)")
    # The weights: one volume per pod from volumeClaimTemplates, never one
    # ReadWriteOnce claim shared by every replica.
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
    mounts = {m["name"] for m in vllm.get("volumeMounts") or []}
    if not claims & mounts:
        errors.append(f"{n}: vllm's model cache is not a volumeClaimTemplate (one volume per GPU)")
    for v in pod.get("volumes") or []:
        if "persistentVolumeClaim" in v:
            errors.append(f"{n}: volume {v['name']} is one claim shared by every replica")
    return errors


def seeded(path):
    """Break the rendered gpu overlay in the ways issue 24 rules out, one at a
    time, and require palaver's rules to name each break."""
    import copy
    import contextlib
    import io
    import tempfile
    docs = load([path])
    sts = lambda ds: next(d for d in ds if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "palaver-inference")
    pod = lambda ds: sts(ds)["spec"]["template"]["spec"]
    vllm = lambda ds: next(c for c in pod(ds)["containers"] if c["name"] == "vllm")
    env = lambda ds: next(d for d in ds if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("palaver-env"))["data"]

    def two_gpus(ds):
        vllm(ds)["resources"] = {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 2}}

    def shared_vllm(ds):
        env(ds)["PALAVER_INFERENCE_VLLM_URL"] = "http://palaver-vllm:8000"

    def shared_cache(ds):
        del sts(ds)["spec"]["volumeClaimTemplates"]
        pod(ds)["volumes"].append({"name": "hf-cache", "persistentVolumeClaim": {"claimName": "palaver-vllm-cache"}})

    def no_vllm(ds):
        pod(ds)["containers"] = [c for c in pod(ds)["containers"] if c["name"] != "vllm"]

    def second_vllm(ds):
        pod(ds)["containers"].append(dict(copy.deepcopy(vllm(ds)), name="vllm-2"))

    def vllm_deployment(ds):
        ds.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "palaver-vllm"},
                   "spec": {"template": {"spec": {"containers": [copy.deepcopy(vllm(ds))]}}}})

    def as_deployment(ds):
        sts(ds)["kind"] = "Deployment"

    def on_delete(ds):
        sts(ds)["spec"]["updateStrategy"] = {"type": "OnDelete"}

    errors = []
    seeds = [two_gpus, shared_vllm, shared_cache, no_vllm, second_vllm, vllm_deployment, as_deployment, on_delete]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            palaver([path])
    except SystemExit:
        report("seeded violations", ["the render fails palaver's rules before any seed"], path)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            ds = copy.deepcopy(docs)
            seed(ds)
            f = Path(tmp) / f"{seed.__name__}.yaml"
            f.write_text(yaml.safe_dump_all(ds))
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    palaver([f])
                    caught = False
                except SystemExit as e:
                    caught = e.code not in (0, None)
            first = next((l.strip().removeprefix("FAIL ") for l in out.getvalue().splitlines() if "FAIL" in l), "")
            print(f"{seed.__name__}: " + (f"caught: {first}" if caught else "NOT REPORTED"))
            if not caught:
                errors.append(f"{seed.__name__}: not reported")
    report("seeded violations", errors, f"{len(seeds)} seeds")


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
        # The observability profile's third-party tools are off the turn's path.
        if "healthcheck" not in spec and "observability" not in spec.get("profiles", []):
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
        "seeded": lambda args: seeded(args[0]),
    }
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        print(__doc__)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])
