#!/usr/bin/env bash
# Checks the operations files offline: the Prometheus alert rules (`promtool check rules`
# and the rule unit tests, Debian's `prometheus` package ships promtool) and the Kubernetes
# manifests against the Kubernetes API schemas (`kubernetes-validate --strict`, from PyPI,
# bundled schemas, no cluster needed). The PrometheusRule and ServiceMonitor are CRDs the
# schema check does not know: tests/deploy.rs keeps the PrometheusRule identical to the
# promtool-checked rules file and checks the ServiceMonitor against the Service.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool check rules deploy/monitoring/tokenvault.rules.yml
promtool test rules deploy/monitoring/tokenvault.rules.test.yml

venv=target/k8s-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'kubernetes-validate==1.37.0'
fi
# --strict rejects unknown fields (a misspelt key is otherwise silently ignored).
"$venv/bin/kubernetes-validate" --strict --quiet \
    deploy/kubernetes/namespace.yaml deploy/kubernetes/networkpolicy.yaml \
    deploy/kubernetes/secret.example.yaml deploy/kubernetes/service.yaml \
    deploy/kubernetes/serviceaccount.yaml deploy/kubernetes/statefulset.yaml
# The PostgreSQL mode's stateless replicas (kustomization.yaml is kustomize's, not an API
# object).
"$venv/bin/kubernetes-validate" --strict --quiet \
    deploy/kubernetes-postgres/deployment.yaml deploy/kubernetes-postgres/init-job.yaml \
    deploy/kubernetes-postgres/pdb.yaml
echo "monitoring rules and Kubernetes manifests (SQLite and PostgreSQL modes): OK"
