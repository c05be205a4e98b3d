"""An offline Kustomize for the tests: the subset deploy/kustomize uses, loud outside it.

Supported, with Kustomize's semantics (checked against ``kubectl kustomize`` by
test_kustomize.py when kubectl is installed):

- ``resources``: YAML files inside the kustomization's directory, and directories holding a
  Kustomization (anywhere, as Kustomize allows, by a relative path);
- ``components``: directories holding a Component (``kustomize.config.k8s.io/v1alpha1``),
  applied in order to what was accumulated so far;
- ``configMapGenerator``: ``name``, ``namespace``, ``files`` (``key=path`` or ``path``); the
  name gets Kustomize's content-hash suffix at the end of the top-level build, and references
  from pod templates (volumes, projected volumes, env, envFrom) are renamed with it;
- ``patches``: ``path`` to a strategic-merge patch naming its target by apiVersion, kind,
  name and namespace. Maps merge, ``null`` deletes, lists are merged by key only where the
  Kubernetes schema says so for pod templates (containers and volumes by name, env by name,
  volumeMounts by mountPath, ports by containerPort), with Kustomize's order: the patch's
  items first, then the untouched ones.

Everything else raises KustomizeError: another kustomization field, a remote resource, a file
outside the kustomization's directory (Kustomize's default load restriction, symlinks
resolved), a patch with a ``target`` or ``$patch`` directives, a patch matching no resource,
a list merge this module has no key for, two resources with the same identity.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
API_VERSIONS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
}
FIELDS = {"apiVersion", "kind", "resources", "components", "configMapGenerator", "patches"}
GENERATOR_FIELDS = {"name", "namespace", "files"}

# Strategic-merge keys of the lists this module merges, by path from the resource's root
# (list items add nothing to the path), for kinds with a pod template.
_POD = ("spec", "template", "spec")
MERGE_KEYS: dict[tuple[str, ...], str] = {
    (*_POD, "containers"): "name",
    (*_POD, "initContainers"): "name",
    (*_POD, "volumes"): "name",
    (*_POD, "containers", "env"): "name",
    (*_POD, "initContainers", "env"): "name",
    (*_POD, "containers", "volumeMounts"): "mountPath",
    (*_POD, "initContainers", "volumeMounts"): "mountPath",
    (*_POD, "containers", "ports"): "containerPort",
}
POD_TEMPLATE_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}
GENERATED = "spiffe-delegate.test/generated"  # marks generated ConfigMaps during a build


class KustomizeError(Exception):
    """The kustomization is invalid, or uses something this renderer does not support."""


def build(directory: Path | str) -> list[Resource]:
    """Renders the Kustomization in ``directory`` as ``kubectl kustomize`` would."""
    resources = _build(Path(directory).resolve(), "Kustomization", [])
    _add_hash_suffixes(resources)
    return resources


def resource_id(resource: Resource) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): what makes a resource unique in a build."""
    group = resource.get("apiVersion", "").rpartition("/")[0]
    meta = resource.get("metadata") or {}
    return group, resource.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def config_map_hash(config_map: Resource) -> str:
    """Kustomize's name suffix for a ConfigMap (api/hasher): sha256 of Go's JSON of kind,
    data and name, where the name is always "" (Kustomize looks up "metadata/name" as one
    field), the first 10 hex digits with 0, 1, 3, a, e swapped for g, h, k, m, t."""
    if config_map.get("binaryData") or config_map.get("immutable") is not None:
        raise KustomizeError("binaryData and immutable ConfigMaps are not supported")
    encoded = json.dumps({"kind": "ConfigMap", "name": "", "data": config_map.get("data", "")},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(char, escape)  # Go's json.Marshal escapes these
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


# --- loading ----------------------------------------------------------------------------

def _kustomization(root: Path, kind: str) -> dict[str, Any]:
    if not root.is_dir():
        raise KustomizeError(f"{root} is not a directory")
    found = [root / name for name in KUSTOMIZATION_FILES if (root / name).is_file()]
    if len(found) != 1:
        raise KustomizeError(f"{root}: expected one of {KUSTOMIZATION_FILES}, found "
                             f"{[p.name for p in found]}")
    document = yaml.safe_load(found[0].read_text())
    if not isinstance(document, dict):
        raise KustomizeError(f"{found[0]} is not a YAML mapping")
    unknown = set(document) - FIELDS
    if unknown:
        raise KustomizeError(f"{found[0]}: fields not supported by this renderer: "
                             f"{sorted(unknown)}")
    if document.get("kind", "Kustomization") != kind:
        raise KustomizeError(f"{found[0]} is a {document.get('kind')}, expected a {kind}")
    if document.get("apiVersion", API_VERSIONS[kind]) != API_VERSIONS[kind]:
        raise KustomizeError(f"{found[0]}: apiVersion {document['apiVersion']!r}, expected "
                             f"{API_VERSIONS[kind]}")
    for field in ("resources", "components", "configMapGenerator", "patches"):
        if not isinstance(document.get(field, []), list):
            raise KustomizeError(f"{found[0]}: {field} must be a list")
    return document


def _inside(root: Path, relative: str) -> Path:
    """``root/relative`` if it stays inside ``root`` once symlinks are resolved (Kustomize's
    LoadRestrictionsRootOnly)."""
    if not isinstance(relative, str) or "://" in relative or relative.startswith("git@"):
        raise KustomizeError(f"{root}: {relative!r}: only local paths are supported")
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise KustomizeError(f"security; file {path} is not in or below {root}")
    if not path.is_file():
        raise KustomizeError(f"{root}: {relative} does not exist or is not a file")
    return path


def _documents(path: Path) -> list[Resource]:
    resources = []
    for document in yaml.safe_load_all(path.read_text()):
        if document is None:
            continue
        if not isinstance(document, dict) or not {"apiVersion", "kind"} <= document.keys():
            raise KustomizeError(f"{path}: a document without apiVersion and kind")
        if not (document.get("metadata") or {}).get("name"):
            raise KustomizeError(f"{path}: a {document['kind']} without metadata.name")
        if document["kind"].endswith("List"):
            raise KustomizeError(f"{path}: List resources are not supported")
        resources.append(document)
    return resources


# --- building ---------------------------------------------------------------------------

def _build(root: Path, kind: str, accumulated: list[Resource]) -> list[Resource]:
    """Kustomize's order: resources, components, generators, patches."""
    kustomization = _kustomization(root, kind)
    for entry in [*kustomization.get("resources", []), *kustomization.get("components", [])]:
        if isinstance(entry, str) and entry.startswith("/"):
            raise KustomizeError(f"{root}: {entry}: new root cannot be absolute")
    resources = list(accumulated)
    for entry in kustomization.get("resources", []):
        if isinstance(entry, str) and "://" not in entry and (root / entry).is_dir():
            _add(resources, _build((root / entry).resolve(), "Kustomization", []), root)
        else:
            _add(resources, _documents(_inside(root, entry)), root)
    for entry in kustomization.get("components", []):
        if not isinstance(entry, str) or not (root / entry).is_dir():
            raise KustomizeError(f"{root}: component {entry!r} is not a local directory")
        resources = _build((root / entry).resolve(), "Component", resources)
    for generator in kustomization.get("configMapGenerator", []):
        _add(resources, [_generate(root, generator)], root)
    for patch in kustomization.get("patches", []):
        _patch(root, patch, resources)
    return resources


def _add(resources: list[Resource], new: Iterable[Resource], root: Path) -> None:
    seen = {resource_id(r) for r in resources}
    for resource in new:
        rid = resource_id(resource)
        if rid in seen:
            raise KustomizeError(f"{root}: may not add resource with an already registered id: "
                                 f"{rid}")
        seen.add(rid)
        resources.append(resource)


def _generate(root: Path, generator: Any) -> Resource:
    if not isinstance(generator, dict) or set(generator) - GENERATOR_FIELDS:
        raise KustomizeError(f"{root}: configMapGenerator supports only {GENERATOR_FIELDS}: "
                             f"{generator!r}")
    if not generator.get("name") or not generator.get("files"):
        raise KustomizeError(f"{root}: configMapGenerator needs a name and files")
    data: dict[str, str] = {}
    for entry in generator["files"]:
        key, sep, relative = str(entry).partition("=")
        if not sep:
            key, relative = Path(entry).name, entry
        if key in data:
            raise KustomizeError(f"{root}: configMapGenerator {generator['name']}: key {key} "
                                 "given twice")
        try:
            data[key] = _inside(root, relative).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise KustomizeError(f"{root}: {relative} is not UTF-8 (binaryData is not "
                                 "supported)") from None
    metadata: dict[str, Any] = {"name": generator["name"],
                                "annotations": {GENERATED: "true"}}
    if generator.get("namespace"):
        metadata["namespace"] = generator["namespace"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _patch(root: Path, entry: Any, resources: list[Resource]) -> None:
    if not isinstance(entry, dict) or set(entry) != {"path"}:
        raise KustomizeError(f"{root}: only `patches: - path: FILE` is supported, not "
                             f"{entry!r}")
    path = _inside(root, entry["path"])
    documents = _documents(path)
    if len(documents) != 1:
        raise KustomizeError(f"{path}: a patch file must hold exactly one document")
    [patch] = documents
    target = resource_id(patch)
    matches = [r for r in resources if resource_id(r) == target]
    if len(matches) != 1:
        raise KustomizeError(f"{path}: the patch matches {len(matches)} resources (target "
                             f"{target})")
    [resource] = matches
    if patch["apiVersion"] != resource["apiVersion"]:
        raise KustomizeError(f"{path}: apiVersion {patch['apiVersion']} differs from the "
                             f"target's {resource['apiVersion']}")
    merge_keys = MERGE_KEYS if resource["kind"] in POD_TEMPLATE_KINDS else {}
    _merge(resource, patch, (), merge_keys, str(path))


def _merge(target: dict[str, Any], patch: dict[str, Any], path: tuple[str, ...],
           merge_keys: dict[tuple[str, ...], str], where: str) -> None:
    for key, value in patch.items():
        here = (*path, key)
        if key.startswith("$"):
            raise KustomizeError(f"{where}: {'.'.join(here)}: patch directives are not "
                                 "supported")
        if value is None:
            target.pop(key, None)
        elif key not in target or target[key] is None:
            _reject_directives(value, here, where)
            target[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(target[key], dict):
            _merge(target[key], value, here, merge_keys, where)
        elif isinstance(value, list) and isinstance(target[key], list):
            target[key] = _merge_list(target[key], value, here, merge_keys, where)
        elif isinstance(value, dict | list) or isinstance(target[key], dict | list):
            raise KustomizeError(f"{where}: {'.'.join(here)}: cannot merge a "
                                 f"{type(value).__name__} into a {type(target[key]).__name__}")
        else:
            target[key] = value


def _merge_list(target: list[Any], patch: list[Any], path: tuple[str, ...],
                merge_keys: dict[tuple[str, ...], str], where: str) -> list[Any]:
    key = merge_keys.get(path)
    if key is None:
        raise KustomizeError(f"{where}: {'.'.join(path)}: merging two lists needs a merge "
                             "key this renderer does not know (it would replace or merge "
                             "depending on the schema)")
    by_key = {}
    for item in target:
        if not isinstance(item, dict) or key not in item:
            raise KustomizeError(f"{where}: {'.'.join(path)}: an item without {key}")
        by_key[item[key]] = item
    merged, patched = [], set()
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise KustomizeError(f"{where}: {'.'.join(path)}: a patch item without {key}")
        if item[key] in patched:
            raise KustomizeError(f"{where}: {'.'.join(path)}: {key} {item[key]} given twice")
        patched.add(item[key])
        if item[key] in by_key:
            original = copy.deepcopy(by_key[item[key]])
            _merge(original, item, path, merge_keys, where)
            merged.append(original)
        else:
            _reject_directives(item, path, where)
            merged.append(copy.deepcopy(item))
    return merged + [item for item in target if item[key] not in patched]


def _reject_directives(value: Any, path: tuple[str, ...], where: str) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key.startswith("$"):
                raise KustomizeError(f"{where}: {'.'.join((*path, key))}: patch directives "
                                     "are not supported")
            _reject_directives(inner, (*path, key), where)
    elif isinstance(value, list):
        for inner in value:
            _reject_directives(inner, path, where)


# --- generated names --------------------------------------------------------------------

def _add_hash_suffixes(resources: list[Resource]) -> None:
    """Kustomize's last step: hashed names for generated ConfigMaps, references renamed."""
    renames: dict[tuple[str, str], str] = {}
    for resource in resources:
        annotations = resource["metadata"].get("annotations", {})
        if resource["kind"] == "ConfigMap" and annotations.pop(GENERATED, None):
            if not annotations:
                del resource["metadata"]["annotations"]
            old = resource["metadata"]["name"]
            new = f"{old}-{config_map_hash(resource)}"
            renames[(resource["metadata"].get("namespace", ""), old)] = new
            resource["metadata"]["name"] = new
    for resource in resources:
        if resource["kind"] not in POD_TEMPLATE_KINDS:
            continue
        namespace = resource["metadata"].get("namespace", "")
        for ref in _config_map_refs(resource["spec"]["template"]["spec"]):
            ref["name"] = renames.get((namespace, ref.get("name", "")), ref.get("name"))


def _config_map_refs(pod: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            yield volume["configMap"]
        for source in (volume.get("projected") or {}).get("sources", []):
            if "configMap" in source:
                yield source["configMap"]
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        for env in container.get("env", []):
            ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                yield ref
        for env_from in container.get("envFrom", []):
            if "configMapRef" in env_from:
                yield env_from["configMapRef"]
