"""A small kustomize in Python, for rendering deploy/k8s offline in tests (no kubectl here).

It implements the part of kustomize the manifests use, and refuses any other field, so a
manifest cannot rely on something this renderer silently ignores:
- Kustomization: resources (files, directories), components, namespace, labels (pairs, without
  selectors or templates), images (newName/newTag), patches (strategic merge, from a file, matched
  by kind and name), configMapGenerator (files, options.disableNameSuffixHash: true, labels).
- Component: resources, patches, configMapGenerator.
Strategic merge: maps merge, lists of known merge keys merge by key (`$patch: delete` removes an
element), other lists are replaced; a whole-resource `$patch: delete` removes the resource.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "components", "images", "patches",
                      "configMapGenerator"}
COMPONENT_KEYS = {"apiVersion", "kind", "resources", "patches", "configMapGenerator"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "ClusterTriggerAuthentication"}
# The strategic-merge keys of the lists the manifests patch (from the Kubernetes API's
# x-kubernetes-patch-merge-key markers).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "volumeMounts": "mountPath",
              "env": "name", "ports": "containerPort", "envFrom": None}


class KustomizeError(ValueError):
    pass


def load_yaml_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def key_of(res: dict) -> tuple[str, str]:
    return res["kind"], res["metadata"]["name"]


def render(directory: str | Path) -> list[dict]:
    """The resources `kubectl kustomize DIRECTORY` would print, in order."""
    directory = Path(directory)
    kust = read_kustomization(directory, component=False)
    resources = load_resources(directory, kust.get("resources", []))
    for comp in kust.get("components", []):
        resources = apply_component(directory / comp, resources)
    resources += generate(directory, kust.get("configMapGenerator", []))
    resources = apply_patches(directory, kust.get("patches", []), resources)
    if "namespace" in kust:
        for res in resources:
            if res["kind"] not in CLUSTER_SCOPED:
                res["metadata"]["namespace"] = kust["namespace"]
    for entry in kust.get("labels", []):
        if set(entry) - {"pairs", "includeSelectors", "includeTemplates"} or entry.get("includeSelectors") \
                or entry.get("includeTemplates"):
            raise KustomizeError(f"{directory}: labels entry {entry} not supported here")
        for res in resources:
            res["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in kust.get("images", []):
        set_image(resources, image)
    seen = set()
    for res in resources:
        ident = (res["kind"], res["metadata"].get("namespace"), res["metadata"]["name"])
        if ident in seen:
            raise KustomizeError(f"{directory}: {ident} defined twice")
        seen.add(ident)
    return resources


def read_kustomization(directory: Path, component: bool) -> dict:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    kust = yaml.safe_load(path.read_text())
    want = ("kustomize.config.k8s.io/v1alpha1", "Component") if component else \
        ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    if (kust.get("apiVersion"), kust.get("kind")) != want:
        raise KustomizeError(f"{path}: expected {want[1]} ({want[0]})")
    unknown = set(kust) - (COMPONENT_KEYS if component else KUSTOMIZATION_KEYS)
    if unknown:
        raise KustomizeError(f"{path}: fields not supported by this renderer: {sorted(unknown)}")
    return kust


def load_resources(directory: Path, entries: list[str]) -> list[dict]:
    out = []
    for entry in entries:
        path = directory / entry
        if path.is_dir():
            out += render(path)
        elif path.is_file():
            out += [d for d in load_yaml_docs(path)]
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")
    return out


def apply_component(directory: Path, resources: list[dict]) -> list[dict]:
    kust = read_kustomization(directory, component=True)
    resources = resources + load_resources(directory, kust.get("resources", []))
    resources += generate(directory, kust.get("configMapGenerator", []))
    return apply_patches(directory, kust.get("patches", []), resources)


def generate(directory: Path, generators: list[dict]) -> list[dict]:
    out = []
    for gen in generators:
        if set(gen) - {"name", "files", "options"}:
            raise KustomizeError(f"{directory}: configMapGenerator fields {sorted(set(gen))} not supported")
        options = gen.get("options", {})
        if options.get("disableNameSuffixHash") is not True or set(options) - {"disableNameSuffixHash", "labels"}:
            raise KustomizeError(f"{directory}: configMapGenerator needs options.disableNameSuffixHash: true")
        data = {}
        for name in gen.get("files", []):
            path = directory / name
            if not path.is_file():
                raise KustomizeError(f"{directory}: generator file {name} does not exist")
            data[Path(name).name] = path.read_text()
        meta = {"name": gen["name"]}
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


def apply_patches(directory: Path, patches: list[dict], resources: list[dict]) -> list[dict]:
    for patch in patches:
        if set(patch) != {"path"}:
            raise KustomizeError(f"{directory}: only `patches: - path: FILE` (strategic merge) is supported")
        for doc in load_yaml_docs(directory / patch["path"]):
            matches = [r for r in resources if key_of(r) == key_of(doc)]
            if len(matches) != 1:
                raise KustomizeError(f"{directory}: patch for {key_of(doc)} matches {len(matches)} resources")
            if doc.get("$patch") == "delete":
                resources = [r for r in resources if r is not matches[0]]
                continue
            merged = strategic_merge(matches[0], doc)
            resources = [merged if r is matches[0] else r for r in resources]
    return resources


def strategic_merge(base, patch, field: str | None = None):
    if isinstance(patch, dict) and isinstance(base, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if k.startswith("$"):
                raise KustomizeError(f"directive {k} not supported here")
            out[k] = strategic_merge(base[k], v, k) if k in base else strip_directives(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and MERGE_KEYS.get(field):
        key = MERGE_KEYS[field]
        out = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if item.get("$patch") == "delete":
                if index is None:
                    raise KustomizeError(f"$patch: delete of {field} {item.get(key)!r}: not there")
                del out[index]
            elif index is None:
                out.append(strip_directives(item))
            else:
                out[index] = strategic_merge(out[index], item, None)
        return out
    return strip_directives(patch)


def strip_directives(value):
    if isinstance(value, dict):
        return {k: strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [strip_directives(v) for v in value]
    return copy.deepcopy(value)


def pod_spec(res: dict) -> dict | None:
    kind = res["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return res["spec"]["template"]["spec"]
    if kind == "CronJob":
        return res["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return res["spec"]
    return None


def containers(res: dict) -> list[dict]:
    spec = pod_spec(res)
    return [] if spec is None else spec.get("initContainers", []) + spec.get("containers", [])


def set_image(resources: list[dict], image: dict) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"images entry {image} not supported here")
    for res in resources:
        for c in containers(res):
            name, tag = split_image(c["image"])
            if name == image["name"]:
                new = image.get("newName", name)
                tag = image.get("newTag", tag)
                c["image"] = f"{new}:{tag}" if tag else new


def split_image(ref: str) -> tuple[str, str | None]:
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = ref.rsplit(":", 1)
        return name, tag
    return ref, None
