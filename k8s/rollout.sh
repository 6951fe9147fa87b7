#!/usr/bin/env bash
# Roll a release out to the cluster of the current kubectl context, from nothing
# or over a running installation:
#
#   k8s/rollout.sh OVERLAY IMAGE@sha256:DIGEST
#
# 1. render k8s/overlays/OVERLAY with the image pinned by digest (k8s/release.py);
# 2. replace the Jobs of the release (their pod templates are immutable): the
#    database migration prefect-migrate and the registration taxi-deploy;
# 3. apply everything server-side, pruning what this release no longer contains
#    (an ApplySet: objects of earlier releases that the manifests dropped are deleted);
# 4. wait, in this order: the StatefulSets (PostgreSQL, Redis), the migration Job
#    (`prefect server database upgrade -y`), then every Deployment: the new API and
#    services pods wait in an init container until the schema is their image's, and the
#    old ones serve until then (maxUnavailable 0);
# 5. wait for the registration Job (`python -m deploy` in the image: work pool,
#    deployments, automations).
#
# The deploy workflow runs it on every push to main (.github/workflows/deploy.yml);
# a person can run it the same way (k8s/README.md). Needs kubectl and python3.
set -euo pipefail

overlay=${1:?usage: k8s/rollout.sh OVERLAY IMAGE@sha256:DIGEST}
image=${2:?usage: k8s/rollout.sh OVERLAY IMAGE@sha256:DIGEST}
namespace=${NAMESPACE:-data-pipeline}
timeout=${ROLLOUT_TIMEOUT:-15m}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

release=$(mktemp -d)
trap 'rm -rf "$release"' EXIT
python3 "$here/release.py" --overlay "$here/overlays/$overlay" --image "$image" \
  --out "$release/kustomization"
kubectl kustomize "$release/kustomization" >"$release/manifests.yaml"

for job in prefect-migrate taxi-deploy; do
  kubectl -n "$namespace" delete job "$job" --ignore-not-found --wait=true
done

# The ApplySet's parent (a ConfigMap in the namespace) lists what the last apply
# contained; --prune deletes what was there and is gone now.
KUBECTL_APPLYSET=true kubectl apply --namespace "$namespace" --server-side \
  --field-manager=taxi-pipeline-rollout --force-conflicts \
  --applyset=configmaps/taxi-pipeline-release --prune \
  --filename "$release/manifests.yaml"

workloads=$(python3 "$here/release.py" --workloads "$release/manifests.yaml")
for workload in $workloads; do
  case $workload in
    statefulset/*) kubectl -n "$namespace" rollout status "$workload" --timeout="$timeout" ;;
  esac
done
# The schema before the servers (every overlay has the Job: tests/test_k8s_server_ha.py).
kubectl -n "$namespace" wait --for=condition=complete job/prefect-migrate --timeout=30m
for workload in $workloads; do
  case $workload in
    deployment/*) kubectl -n "$namespace" rollout status "$workload" --timeout="$timeout" ;;
  esac
done
kubectl -n "$namespace" wait --for=condition=complete job/taxi-deploy --timeout=30m
