#!/usr/bin/env python3
"""Lints and renders helm/pushnode with several value sets, validates every manifest against
the Kubernetes schemas (kubernetes-validate --strict), and feeds the rendered pushnode.toml to
the real binary (`pushnode config`), which refuses unknown keys and bad values.

Usage: check.py PUSHNODE_BINARY. Needs helm-python-sdk and kubernetes-validate (pinned in
helm/requirements.txt); .ci/run installs them into a virtualenv.
"""
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pushnode")
SECRETS = {"auth": {"jwtSecret": "s" * 40, "apiKeys": ["k" * 24]}}
VALUE_SETS = {
    "defaults": SECRETS,
    "everything-on": {
        **SECRETS,
        "ingress": {"enabled": True, "tls": [{"secretName": "push-tls", "hosts": ["push.example.com"]}]},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
    "redis-cluster": {
        **SECRETS,
        "config": {"broker": {"kind": "redis-cluster", "cluster_nodes": ["redis://redis-0.redis:6379"]}},
    },
    "keda-existing-secret": {"auth": {"existingSecret": "pushnode-keys"}, "keda": {"enabled": True}},
    "no-autoscaling": {**SECRETS, "autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
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
                    check_custom(doc, failures, name)
                    continue
                path = os.path.join(tmp, f"{i}-{doc['kind']}.yaml")
                with open(path, "w") as f:
                    yaml.safe_dump(doc, f)
                files.append(path)
            out = subprocess.run(
                ["kubernetes-validate", "--strict", "--quiet", "-k", "1.33.0", *files],
                capture_output=True, text=True,
            )
            if out.returncode != 0:
                failures.append(f"{name}: kubernetes-validate:\n{out.stdout}{out.stderr}")
            for doc in docs:
                if doc["kind"] == "ConfigMap" and "pushnode.toml" in doc.get("data", {}):
                    check_config(binary, doc["data"]["pushnode.toml"], tmp, failures, name)
        expected = {"Deployment", "Service", "ConfigMap"}
        if not expected <= set(kinds):
            failures.append(f"{name}: missing {expected - set(kinds)}")
    try:
        chart.render({}, name="push", namespace="apps")
        failures.append("rendering without secrets must fail")
    except Exception as e:  # the chart's `fail` message
        if "jwtSecret" not in str(e):
            failures.append(f"unexpected render error without secrets: {e}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)
    print("chart ok")


def check_custom(doc, failures, name):
    spec = doc.get("spec") or {}
    if doc["kind"] == "PrometheusRule" and not spec.get("groups"):
        failures.append(f"{name}: PrometheusRule without groups")
    if doc["kind"] == "ServiceMonitor" and not spec.get("endpoints"):
        failures.append(f"{name}: ServiceMonitor without endpoints")
    if doc["kind"] == "ScaledObject" and not spec.get("triggers"):
        failures.append(f"{name}: ScaledObject without triggers")


def check_config(binary, toml, tmp, failures, name):
    path = os.path.join(tmp, "pushnode.toml")
    with open(path, "w") as f:
        f.write(toml)
    env = {**os.environ, "PUSHNODE__AUTH__JWT_SECRET": "s" * 40, "PUSHNODE__AUTH__API_KEYS": "k" * 24}
    out = subprocess.run([binary, "config", "--config", path], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        failures.append(f"{name}: pushnode rejects the rendered config: {out.stderr}\n{toml}")


if __name__ == "__main__":
    main(sys.argv[1])
