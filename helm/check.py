#!/usr/bin/env python3
"""Lints and renders helm/pushnode with several value sets, validates every manifest against
the Kubernetes schemas (kubernetes-validate --strict), and feeds the rendered pushnode.toml to
the real binary (`pushnode config`), which refuses unknown keys and bad values.

Usage: check.py PUSHNODE_BINARY. Needs helm-python-sdk and kubernetes-validate (pinned in
helm/requirements.txt); .ci/run installs them into a virtualenv.
"""
import os
import re
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pushnode")
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion; the preStop sleep action) and
# the newest whose schemas kubernetes-validate carries.
KUBE_VERSIONS = ["1.30.0", "1.33.0"]
SECRETS = {"auth": {"jwtSecret": "s" * 40, "apiKeys": ["k" * 24]}}
# What a Secret named by existingSecret holds in these checks.
EXISTING = {
    "jwt-secret": "s" * 40,
    "api-keys": "k" * 24,
    "redis-url": "redis://redis:6379",
    "pusher-app-0-secret": "p" * 20,
    "pusher-app-1-secret": "q" * 20,
}
PUSHER_APPS = [
    {"id": "1001", "key": "app-key", "secret": "app-secret-0123", "enableClientMessages": True},
    {"id": "1002", "key": "other-key", "secret": "other-secret-0123", "maxConnections": 5000},
]
VALUE_SETS = {
    "defaults": SECRETS,
    "everything-on": {
        **SECRETS,
        "ingress": {"enabled": True, "tls": [{"secretName": "push-tls", "hosts": ["push.example.com"]}]},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
        "networkPolicy": {"enabled": True},
        "extraEnv": [{"name": "PUSHNODE__LOG__FILTER", "value": "debug"}],
        "envFrom": [{"configMapRef": {"name": "more-pushnode-settings"}}],
    },
    "tls-redis": {
        **SECRETS,
        "redis": {"url": "rediss://:hunter2@redis.example.com:6380", "tlsCaSecret": "redis-ca"},
        "networkPolicy": {
            "enabled": True,
            "internalFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}}],
            "publicFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        },
    },
    "redis-cluster": {
        **SECRETS,
        "config": {"broker": {"kind": "redis-cluster"}},
        "redis": {"clusterNodes": ["redis://redis-0.redis:6379", "redis://redis-1.redis:6379"]},
    },
    "keda-existing-secret": {
        "auth": {"existingSecret": "pushnode-keys"},
        "redis": {"existingSecret": "pushnode-keys"},
        "keda": {"enabled": True},
    },
    "no-autoscaling": {**SECRETS, "autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
    "pusher-only": {
        "pusher": {"apps": PUSHER_APPS},
        "config": {
            "pusher": {"persist_notifications": True},
            "webhooks": {"endpoints": [{"app": "1001", "url": "https://app.example.com/pusher/webhook", "events": ["channel_occupied"]}]},
        },
    },
    "pusher-and-native-existing-secret": {
        **SECRETS,
        "pusher": {"apps": [{"id": "1001", "key": "app-key"}], "existingSecret": "pusher-keys"},
    },
    "minutes-and-millis": {
        **SECRETS,
        "config": {"server": {"drain_period": "1m30s", "shutdown_grace": "500ms"}, "limits": {"max_memory_bytes": 123456789}},
        "resources": {"limits": {"memory": "2G"}},
        "topologySpread": {"enabled": False},
    },
}
# Renders that must fail, and a word the chart's message must contain.
MUST_FAIL = {
    "no secrets": ({}, "jwtSecret"),
    "redis url in the ConfigMap": ({**SECRETS, "config": {"broker": {"redis_url": "redis://:pw@redis:6379"}}}, "redis.*"),
    "a duration the chart cannot read": ({**SECRETS, "config": {"server": {"drain_period": "20 seconds"}}}, "duration"),
    "a fractional memory limit": ({**SECRETS, "resources": {"limits": {"memory": "1.5Gi"}}}, "whole units"),
    "redis-cluster without nodes": ({**SECRETS, "config": {"broker": {"kind": "redis-cluster"}}}, "clusterNodes"),
    "a Pusher app without a secret": ({"pusher": {"apps": [{"id": "1", "key": "k"}]}}, "secret"),
    "a Pusher app without a key": ({"pusher": {"apps": [{"id": "1", "secret": "s" * 20}]}}, "key"),
}
# Custom resources whose schemas kubernetes-validate does not carry.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


def main(binary):
    failures = []
    chart = helm.Chart.load(CHART)
    for name, values in VALUE_SETS.items():
        report = helm.lint(CHART, values, strict=True)
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        if problems:
            failures.append(f"{name}: helm lint: {problems}")
        manifests = chart.render(values, name="push", namespace="apps", is_install=True)
        docs = []
        for path, text in manifests.items():
            if not path.endswith((".yaml", ".yml")):
                continue
            docs.extend(d for d in yaml.safe_load_all(text) if d)
        kinds = sorted(d["kind"] for d in docs)
        print(f"{name}: {len(docs)} manifests: {', '.join(kinds)}")
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i, doc in enumerate(docs):
                if doc["kind"] in CUSTOM_KINDS:
                    extra = check_custom(doc, failures, name)
                    docs_to_validate = extra
                else:
                    docs_to_validate = [doc]
                for j, d in enumerate(docs_to_validate):
                    path = os.path.join(tmp, f"{i}-{j}-{d['kind']}.yaml")
                    with open(path, "w") as f:
                        yaml.safe_dump(d, f)
                    files.append(path)
            for version in KUBE_VERSIONS:
                out = subprocess.run(
                    ["kubernetes-validate", "--strict", "--quiet", "-k", version, *files],
                    capture_output=True, text=True,
                )
                if out.returncode != 0:
                    failures.append(f"{name}: kubernetes-validate {version}:\n{out.stdout}{out.stderr}")
            check_wiring(binary, name, values, docs, tmp, failures)
        expected = {"Deployment", "Service", "ConfigMap"}
        if not expected <= set(kinds):
            failures.append(f"{name}: missing {expected - set(kinds)}")
    for name, (values, word) in MUST_FAIL.items():
        try:
            chart.render(values, name="push", namespace="apps")
            failures.append(f"rendering with {name} must fail")
        except Exception as e:  # the chart's `fail` message
            if word not in str(e):
                failures.append(f"{name}: unexpected render error (wanted {word!r}): {e}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)
    print("chart ok")


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    return found[0] if found else None


def check_wiring(binary, name, values, docs, tmp, failures):
    """What the chart computes and wires, checked against what the values ask for, and the
    rendered pushnode.toml fed to the binary with the environment the pod would get."""
    deployment = one(docs, "Deployment")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "pushnode.toml" in d.get("data", {}))
    secret = one(docs, "Secret")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    toml = config["data"]["pushnode.toml"]
    if "redis://" in toml or "rediss://" in toml:
        failures.append(f"{name}: a Redis URL is in the ConfigMap:\n{toml}")
    for key in ("checksum/config", "checksum/secret"):
        if key not in pod["metadata"].get("annotations", {}):
            failures.append(f"{name}: pod template lacks {key}")
    # terminationGracePeriodSeconds: preStop + drain + min(1 s, grace) + grace + margin, rounded up.
    server = {"drain_period": "20s", "shutdown_grace": "5s", **values.get("config", {}).get("server", {})}
    drain, grace = seconds(server["drain_period"]), seconds(server["shutdown_grace"])
    want = 5 + -(-round((drain + min(1.0, grace) + grace) * 1000) // 1000) + 5
    got = pod["spec"]["terminationGracePeriodSeconds"]
    if got != want:
        failures.append(f"{name}: terminationGracePeriodSeconds {got}, want {want}")
    # limits.max_memory_bytes: as set, else 80 % of the memory limit.
    explicit = values.get("config", {}).get("limits", {}).get("max_memory_bytes")
    memory = values.get("resources", {}).get("limits", {}).get("memory", "1Gi")
    want_memory = explicit if explicit is not None else bytes_of(memory) * 80 // 100
    if f"max_memory_bytes = {want_memory}\n" not in toml:
        failures.append(f"{name}: max_memory_bytes should be {want_memory}:\n{toml}")
    spread = pod["spec"].get("topologySpreadConstraints", [])
    want_spread = 2 if values.get("topologySpread", {}).get("enabled", True) else 0
    if len(spread) != want_spread:
        failures.append(f"{name}: {len(spread)} topology spread constraints, want {want_spread}")
    policy = one(docs, "NetworkPolicy")
    if bool(policy) != values.get("networkPolicy", {}).get("enabled", False):
        failures.append(f"{name}: NetworkPolicy rendered: {bool(policy)}")
    if policy:
        internal = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "internal"]
        if len(internal) != 1 or not internal[0].get("from"):
            failures.append(f"{name}: the NetworkPolicy leaves the internal port open: {policy['spec']}")
    # The environment the pod gets, resolved from the rendered Secret (or a stand-in for
    # existingSecret), and the configuration the binary must accept with it.
    env = {}
    stored = (secret or {}).get("stringData", {})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            own = secret and ref["name"] == secret["metadata"]["name"]
            env[var["name"]] = stored[ref["key"]] if own else EXISTING[ref["key"]]
        else:
            env[var["name"]] = "push-0"
    kind = values.get("config", {}).get("broker", {}).get("kind", "redis")
    wanted_var = {"redis": "PUSHNODE__BROKER__REDIS_URL", "redis-cluster": "PUSHNODE__BROKER__CLUSTER_NODES"}[kind]
    if wanted_var not in env:
        failures.append(f"{name}: the pod gets no {wanted_var}")
    apps = values.get("pusher", {}).get("apps", [])
    for i, app in enumerate(apps):
        want_app = {f"PUSHNODE__PUSHER__APPS__{i}__ID": app["id"], f"PUSHNODE__PUSHER__APPS__{i}__KEY": app["key"]}
        if any(env.get(k) != v for k, v in want_app.items()) or not env.get(f"PUSHNODE__PUSHER__APPS__{i}__SECRET"):
            failures.append(f"{name}: Pusher app {i} is not wired: {sorted(k for k in env if 'PUSHER' in k)}")
        if app.get("secret") and app["secret"] in toml:
            failures.append(f"{name}: a Pusher secret is in the ConfigMap")
    native = "PUSHNODE__AUTH__JWT_SECRET" in env
    if native != (not apps or "auth" in values):
        failures.append(f"{name}: native auth wired: {native}")
    if values.get("redis", {}).get("tlsCaSecret"):
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        if 'tls_ca_file = "/etc/pushnode/redis-ca/ca.crt"' not in toml or "/etc/pushnode/redis-ca" not in mounts:
            failures.append(f"{name}: the Redis CA is not mounted and configured: {mounts}\n{toml}")
    path = os.path.join(tmp, "pushnode.toml")
    with open(path, "w") as f:
        f.write(toml)
    out = subprocess.run(
        [binary, "config", "--config", path], capture_output=True, text=True, env={**os.environ, **env}
    )
    if out.returncode != 0:
        failures.append(f"{name}: pushnode rejects the rendered config: {out.stderr}\n{toml}")
    elif apps and out.stdout.count("[[pusher.apps]]") != len(apps):
        failures.append(f"{name}: the node sees {out.stdout.count('[[pusher.apps]]')} Pusher apps, want {len(apps)}")
    for endpoint in values.get("config", {}).get("webhooks", {}).get("endpoints", []):
        if endpoint["url"] not in out.stdout:
            failures.append(f"{name}: the node does not see the webhook endpoint {endpoint['url']}:\n{out.stdout}")


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def bytes_of(quantity):
    n, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    scale = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}
    return int(n) * scale[unit]


def check_custom(doc, failures, name):
    """Checks a custom resource's essentials; returns built-in objects embedded in it, for the
    schema validation (KEDA's HPA behaviour, as an HPA)."""
    spec = doc.get("spec") or {}
    if doc["kind"] == "PrometheusRule" and not spec.get("groups"):
        failures.append(f"{name}: PrometheusRule without groups")
    if doc["kind"] == "ServiceMonitor" and not spec.get("endpoints"):
        failures.append(f"{name}: ServiceMonitor without endpoints")
    if doc["kind"] == "ScaledObject":
        if not spec.get("triggers"):
            failures.append(f"{name}: ScaledObject without triggers")
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if not behavior or "scaleDown" not in behavior:
            failures.append(f"{name}: ScaledObject without the HPA's scale-down behaviour")
            return []
        return [{
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "keda-behavior"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": 2,
                "behavior": behavior,
            },
        }]
    return []


if __name__ == "__main__":
    main(sys.argv[1])
