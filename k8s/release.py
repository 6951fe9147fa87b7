#!/usr/bin/env python3
"""Pin the pipeline image of an overlay by digest: the one step between a build and a rollout.

    python3 k8s/release.py --overlay k8s/overlays/gke --image REGISTRY/taxi-pipeline@sha256:... \\
        --out k8s/release/gke

writes OUT/kustomization.yaml: the overlay, with every container named
`taxi-pipeline` (server, worker, bridge, the registration Job) set to IMAGE, and
the registration Job's TAXI_IMAGE (the flow-run image `python -m deploy` puts on
every deployment) set to the same. `kubectl kustomize OUT` is then exactly what
runs. Both deploy paths use it:

- direct: k8s/rollout.sh renders it into a temporary directory and applies it;
- GitOps: CI commits k8s/release/gke/kustomization.yaml, which Flux
  (k8s/gitops/flux/) or Argo CD (k8s/gitops/argocd/) applies.

`--workloads FILE` prints `deployment/NAME` and `statefulset/NAME` for every
workload of a rendered manifest (what k8s/rollout.sh waits for). Standard library
only: CI runs it before installing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

IMAGE_NAME = "taxi-pipeline"  # the image name in k8s/base, replaced here
DEPLOY_JOB = "taxi-deploy"
TAXI_IMAGE_FIELD = "spec.template.spec.containers.0.env.[name=TAXI_IMAGE].value"
DIGEST = re.compile(r"^(?P<name>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")


def release_kustomization(overlay: Path, image: str, out: Path) -> dict[str, object]:
    match = DIGEST.match(image)
    if not match:
        raise SystemExit(f"error: {image!r} is not pinned by digest (NAME@sha256:<64 hex>): "
                         "deploy exactly what was built")
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(overlay.resolve(), out.resolve())],
        "images": [{"name": IMAGE_NAME, "newName": match["name"], "digest": match["digest"]}],
        # After the image transformer: the Job's own image becomes its TAXI_IMAGE.
        "replacements": [{
            "source": {"kind": "Job", "name": DEPLOY_JOB,
                       "fieldPath": "spec.template.spec.containers.0.image"},
            "targets": [{"select": {"kind": "Job", "name": DEPLOY_JOB},
                         "fieldPaths": [TAXI_IMAGE_FIELD]}],
        }],
    }


def write(overlay: Path, image: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    body = json.dumps(release_kustomization(overlay, image, out), indent=2)
    path = out / "kustomization.yaml"
    path.write_text("# Written by k8s/release.py: the overlay with the image CI built, by digest.\n"
                    + body + "\n")
    return path


def workloads(manifest: str) -> list[str]:
    """deployment/NAME and statefulset/NAME of each document, in order (JSON or YAML lists
    are not needed: kubectl kustomize prints `kind:` and `metadata.name` at fixed indents)."""
    found = []
    for doc in manifest.split("\n---\n"):
        kind = re.search(r"^kind: (\S+)$", doc, re.MULTILINE)
        name = re.search(r"^metadata:\n(?:  .*\n)*?  name: (\S+)$", doc, re.MULTILINE)
        if kind and name and kind[1] in ("Deployment", "StatefulSet"):
            found.append(f"{kind[1].lower()}/{name[1]}")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="k8s/release.py", description=__doc__.splitlines()[0])
    parser.add_argument("--overlay", type=Path)
    parser.add_argument("--image")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workloads", type=Path, help="print the workloads of a rendered file")
    args = parser.parse_args(argv)
    if args.workloads:
        print("\n".join(workloads(args.workloads.read_text())))
        return
    if not (args.overlay and args.image and args.out):
        parser.error("--overlay, --image and --out are required")
    if not (args.overlay / "kustomization.yaml").is_file():
        raise SystemExit(f"error: {args.overlay} has no kustomization.yaml")
    print(write(args.overlay, args.image, args.out))


if __name__ == "__main__":
    sys.exit(main())
