#!/usr/bin/env bash
# Roll a release out to the cluster of the current kubectl context, from nothing
# or over a running installation:
#
#   k8s/rollout.sh OVERLAY IMAGE@sha256:DIGEST
#
# 1. render k8s/overlays/OVERLAY with the image pinned by digest (k8s/release.py);
# 2. replace the registration Job (its pod template is immutable);
# 3. apply everything server-side, pruning what this release no longer contains
#    (an ApplySet: objects of earlier releases that the manifests dropped are deleted);
# 4. wait for every Deployment and StatefulSet to finish its rollout;
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

kubectl -n "$namespace" delete job taxi-deploy --ignore-not-found --wait=true

# The ApplySet's parent (a ConfigMap in the namespace) lists what the last apply
# contained; --prune deletes what was there and is gone now.
KUBECTL_APPLYSET=true kubectl apply --namespace "$namespace" --server-side \
  --field-manager=taxi-pipeline-rollout --force-conflicts \
  --applyset=configmaps/taxi-pipeline-release --prune \
  --filename "$release/manifests.yaml"

for workload in $(python3 "$here/release.py" --workloads "$release/manifests.yaml"); do
  kubectl -n "$namespace" rollout status "$workload" --timeout="$timeout"
done
kubectl -n "$namespace" wait --for=condition=complete job/taxi-deploy --timeout=30m
