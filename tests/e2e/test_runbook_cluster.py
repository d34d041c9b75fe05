"""docs/runbook.md's `# cluster` blocks: each kubectl/docker command names only what deploy/ defines.

Not run (they need a Kubernetes cluster or a Docker daemon): every resource (kind/name), label selector,
container, Secret and Secret key, patched field, Service port and repository path must exist in deploy/,
and `docker build` must build deploy/Dockerfile from the repository root.
"""

from __future__ import annotations

import functools
import glob
import json
import os

import yaml

from conf.settings import SETTINGS_BY_ENV
from tests.fixtures.runbook import DEPLOY, blocks, commands
from tests.fixtures.server import REPO

KIND_ALIASES = {"deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment",
                "service": "Service", "services": "Service", "svc": "Service",
                "hpa": "HorizontalPodAutoscaler", "horizontalpodautoscaler": "HorizontalPodAutoscaler",
                "pdb": "PodDisruptionBudget", "poddisruptionbudget": "PodDisruptionBudget",
                "configmap": "ConfigMap", "configmaps": "ConfigMap", "cm": "ConfigMap",
                "secret": "Secret", "secrets": "Secret", "pod": "Pod", "pods": "Pod"}
KUBECTL_VALUE_FLAGS = {"-n", "--namespace", "-l", "--selector", "-c", "--container", "-o", "--output",
                       "-f", "--filename", "-k", "--kustomize", "-p", "--patch", "--type", "--since",
                       "--tail", "--timeout", "--sort-by", "--field-selector", "--replicas"}


# -- what the repository defines ----------------------------------------------------------------

@functools.cache
def manifests() -> dict[tuple[str, str], dict]:
    """(kind, name) -> the object, from every YAML document of deploy/k8s."""
    found = {}
    for path in sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml"))):
        with open(path, encoding="utf-8") as handle:
            for doc in yaml.safe_load_all(handle):
                if isinstance(doc, dict) and "kind" in doc and "metadata" in doc:
                    found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def deployment() -> dict:
    (doc,) = [doc for (kind, _), doc in manifests().items() if kind == "Deployment"]
    return doc


def pod_labels() -> dict:
    return deployment()["spec"]["template"]["metadata"]["labels"]


def containers() -> set[str]:
    return {c["name"] for c in deployment()["spec"]["template"]["spec"]["containers"]}


def secret_keys() -> dict[str, set[str]]:
    """Secret name -> the keys the Deployment reads from it."""
    keys: dict[str, set[str]] = {}
    for container in deployment()["spec"]["template"]["spec"]["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                keys.setdefault(ref["name"], set()).add(ref["key"])
    return keys


def test_cluster_blocks_name_what_deploy_defines():
    cluster = [block for block in blocks() if block.mode == "cluster"]
    checked = 0
    for block in cluster:
        for command in commands(block.code):
            where = f"{block.where()}: {' '.join(command)}"
            if command[0] == "kubectl":
                check_kubectl(command, where)
                checked += 1
            elif command[0] == "docker" and command[1:2] == ["build"]:
                assert "-f" in command and command[command.index("-f") + 1] == "deploy/Dockerfile", where
                assert command[-1] == ".", f"{where}: the build context must be the repository root"
    assert checked >= 20


def check_kubectl(command: list[str], where: str) -> None:
    args = command[1:command.index("--")] if "--" in command else command[1:]
    positional, options = [], {}
    index = 0
    while index < len(args):
        word = args[index]
        if word in KUBECTL_VALUE_FLAGS:
            options.setdefault(word, []).append(args[index + 1])
            index += 2
            continue
        if word.startswith("-"):
            flag, _, value = word.partition("=")
            options.setdefault(flag, []).append(value)
        else:
            positional.append(word)
        index += 1
    verb, rest = positional[0], positional[1:]
    if verb in ("rollout", "set", "top") or rest[:2] == ["secret", "generic"]:
        rest = rest[1:]
    if verb == "create" and rest[:1] == ["generic"]:
        check_secret(rest[1], options.get("--from-literal", []), where)
        return
    for label in options.get("-l", []):
        for pair in label.split(","):
            key, _, value = pair.partition("=")
            assert pod_labels().get(key) == value, f"{where}: no pod label {pair}"
    for container in options.get("-c", []):
        assert container in containers(), f"{where}: no container {container}"
    for path in options.get("-f", []) + options.get("-k", []):
        assert path.startswith("$") or os.path.exists(os.path.join(REPO, path)), f"{where}: no {path}"
    resources = resource_refs(verb, rest)
    for kind, name in resources:
        if not name.startswith("$") and kind != "Pod":
            assert (kind, name) in manifests(), f"{where}: deploy/k8s has no {kind} {name}"
    if verb == "patch":
        (kind, name), patch = resources[0], json.loads(options["-p"][0])
        check_patch(manifests()[(kind, name)], patch, where)
    if verb == "set" and positional[1] == "image":
        for assignment in rest[1:]:
            assert assignment.split("=", 1)[0] in containers(), f"{where}: no container in {assignment}"
    if verb == "port-forward" and resources and resources[0][0] == "Service":
        ports = {str(port["port"]) for port in manifests()[resources[0]]["spec"]["ports"]}
        for mapping in rest[1:]:
            assert mapping.rsplit(":", 1)[-1] in ports, f"{where}: the Service has no port {mapping}"


def resource_refs(verb: str, rest: list[str]) -> list[tuple[str, str]]:
    """(Kind, name) pairs named as kind/name or `kind name`; names may be $variables."""
    if verb in ("apply", "create", "exec", "logs", "port-forward") and rest and "/" not in rest[0] \
            and not rest[0].startswith("$"):
        rest = rest[:1] if verb in ("exec", "logs") else []  # a bare pod name
    refs = []
    for index, word in enumerate(rest):
        if "/" in word:
            kind, _, name = word.partition("/")
            if kind.lower() in KIND_ALIASES:
                refs.append((KIND_ALIASES[kind.lower()], name))
        elif word.lower() in KIND_ALIASES and index + 1 < len(rest) and "/" not in rest[index + 1] \
                and "=" not in rest[index + 1]:
            refs.append((KIND_ALIASES[word.lower()], rest[index + 1]))
    return refs


def check_secret(name: str, literals: list[str], where: str) -> None:
    assert name in secret_keys(), f"{where}: deployment.yaml reads no Secret {name}"
    for literal in literals:
        key = literal.split("=", 1)[0]
        assert key in secret_keys()[name], f"{where}: deployment.yaml reads no key {key} of {name}"
    assert {literal.split("=", 1)[0] for literal in literals} == secret_keys()[name], \
        f"{where}: the Secret must have every key deployment.yaml reads"


def check_patch(resource: dict, patch: dict, where: str, path: str = "") -> None:
    """Every field of the patch exists in the resource; a ConfigMap's data keys are settings."""
    for key, value in patch.items():
        if resource.get("kind") == "ConfigMap" and path == "" and key == "data":
            unknown = set(value) - set(SETTINGS_BY_ENV)
            assert not unknown, f"{where}: {unknown} are not settings"
            continue
        assert key in resource, f"{where}: {path}{key} is not a field of {resource.get('kind', path)}"
        if isinstance(value, dict):
            check_patch(resource[key], value, where, f"{path}{key}.")
