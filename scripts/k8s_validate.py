"""Render the Kustomize base and overlays under ``k8s/`` offline and validate every object.

kubectl/kustomize are not needed: this renders the subset of Kustomize the manifests use
(``resources`` files and directories, ``namespace``, ``labels``, strategic-merge
``patches`` by kind and name, ``images``), then validates each rendered object against the
Kubernetes OpenAPI schemas bundled in ``kubernetes-validate`` (strict: unknown fields fail),
and checks what the schemas cannot: every patch hits one object, names are unique, each
Service and PDB selects a pod template, and every ConfigMap/Secret a pod uses is rendered
(or marked optional, or documented as created out of band).

    python scripts/k8s_validate.py [k8s-dir]      exit status 1 on any problem
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.30.0"  # the oldest minor we support (preStop sleep needs 1.30)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
# Created out of band in production (see overlays/production/kustomization.yaml).
EXTERNAL_SECRETS = {"sluice-provider", "sluice-client-keys", "sluice-database", "sluice-redis"}

Obj = dict[str, Any]


def load_yaml(path: Path) -> list[Obj]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def render(directory: Path) -> list[Obj]:
    """The objects ``kustomize build directory`` would print, for the features we use."""
    spec = load_yaml(directory / "kustomization.yaml")[0]
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        objects += render(target) if target.is_dir() else load_yaml(target)
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        if key(obj) in seen:
            raise ValueError(f"{directory}: duplicate {key(obj)}")
        seen.add(key(obj))
    for patch in spec.get("patches", []):
        for doc in load_yaml(directory / patch["path"]):
            hits = [obj for obj in objects if key(obj) == key(doc)]
            if len(hits) != 1:
                raise ValueError(f"{directory}: patch {patch['path']} matches {len(hits)} objects")
            merged = merge(hits[0], doc)
            hits[0].clear()
            hits[0].update(merged)
    for label in spec.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for container in containers(objects):
            name, _, _tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return objects


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge: maps merge, lists of named maps merge by name, the rest replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for name, value in patch.items():
            out[name] = merge(base[name], value) if name in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out_list = copy.deepcopy(base)
        index = {item["name"]: i for i, item in enumerate(out_list)}
        for item in patch:
            if item["name"] in index:
                out_list[index[item["name"]]] = merge(out_list[index[item["name"]]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return all(isinstance(item, dict) and "name" in item for item in items)


def pod_specs(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [
        (obj, obj["spec"]["template"])
        for obj in objects
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}
    ]


def containers(objects: list[Obj]) -> list[Obj]:
    return [c for _, template in pod_specs(objects) for c in template["spec"]["containers"]]


def check_references(objects: list[Obj], *, external_secrets: bool) -> list[str]:
    problems: list[str] = []
    names = {key(obj) for obj in objects}
    templates = [template["metadata"].get("labels", {}) for _, template in pod_specs(objects)]
    for obj in objects:
        selector = None
        if obj["kind"] == "Service":
            selector = obj["spec"].get("selector")
        elif obj["kind"] == "PodDisruptionBudget":
            selector = obj["spec"]["selector"].get("matchLabels")
        if selector and not any(selector.items() <= labels.items() for labels in templates):
            problems.append(f"{key(obj)} selects no pod template")
    for owner, template in pod_specs(objects):
        for kind, name, optional in _config_refs(template["spec"]):
            known = (kind, name) in names or (external_secrets and name in EXTERNAL_SECRETS)
            if not known and not optional:
                problems.append(f"{key(owner)} uses missing {kind} {name!r}")
        if owner["kind"] == "Deployment":
            labels = template["metadata"].get("labels", {})
            if not owner["spec"]["selector"]["matchLabels"].items() <= labels.items():
                problems.append(f"{key(owner)} selector does not match its template")
    return problems


def _config_refs(pod: Obj) -> list[tuple[str, str, bool]]:
    refs: list[tuple[str, str, bool]] = []
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            secret = volume["secret"]
            refs.append(("Secret", secret["secretName"], secret.get("optional", False)))
        if "configMap" in volume:
            config = volume["configMap"]
            refs.append(("ConfigMap", config["name"], config.get("optional", False)))
    for container in pod["containers"]:
        for source in container.get("envFrom", []):
            for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if field in source:
                    ref = source[field]
                    refs.append((kind, ref["name"], ref.get("optional", False)))
        for env in container.get("env", []):
            value_from = env.get("valueFrom", {})
            for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if field in value_from:
                    ref = value_from[field]
                    refs.append((kind, ref["name"], ref.get("optional", False)))
    return refs


def validate(objects: list[Obj], label: str) -> list[str]:
    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{label}: {key(obj)}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{label}: {key(obj)}: no schema ({exc})")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "k8s")
    kustomizations = sorted(p.parent for p in root.rglob("kustomization.yaml"))
    problems: list[str] = []
    for directory in kustomizations:
        label = str(directory.relative_to(root))
        try:
            objects = render(directory)
        except (ValueError, KeyError, OSError, yaml.YAMLError) as exc:
            problems.append(f"{label}: cannot render: {exc!r}")
            continue
        found = validate(objects, label)
        found += [
            f"{label}: {p}"
            for p in check_references(objects, external_secrets=directory.name != "dev")
        ]
        problems += found
        kinds = ", ".join(sorted({obj["kind"] for obj in objects}))
        status = "FAILED" if found else "ok"
        print(f"k8s-validate: {label}: {len(objects)} objects ({kinds}) {status}")
    for problem in problems:
        print(f"k8s-validate: {problem}", file=sys.stderr)
    if not kustomizations:
        print(f"k8s-validate: no kustomization.yaml under {root}", file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
