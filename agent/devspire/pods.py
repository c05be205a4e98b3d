"""The optional pods file that stands in for the kubelet's pod list."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError


@dataclass(frozen=True)
class Container:
    container_id: str
    name: str = ""
    image: str = ""


@dataclass(frozen=True)
class Pod:
    uid: str
    namespace: str = ""
    service_account: str = ""
    name: str = ""
    node_name: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    containers: tuple[Container, ...] = field(default=())

    def container(self, container_id: str) -> Container | None:
        for c in self.containers:
            if c.container_id == container_id:
                return c
        return None


@dataclass(frozen=True)
class PodList:
    pods: tuple[Pod, ...] = ()

    def by_uid(self, uid: str) -> Pod | None:
        for pod in self.pods:
            if pod.uid == uid:
                return pod
        return None

    def by_container(self, container_id: str) -> Pod | None:
        for pod in self.pods:
            if pod.container(container_id) is not None:
                return pod
        return None


def _str(raw: Mapping[str, object], name: str, where: str) -> str:
    value = raw.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name}: must be a string, got {value!r}")
    return value


def parse_pods(document: object, source: str = "pods") -> PodList:
    """``{"pods": [{"uid", "namespace", "service_account", "name", "labels", "node_name",
    "containers": [{"id", "name", "image"}]}]}``; ConfigError names the pod index and field."""
    if not isinstance(document, Mapping) or not isinstance(document.get("pods"), list):
        raise ConfigError(f"{source}: expected a JSON object {{\"pods\": [...]}}")
    pods: list[Pod] = []
    for index, raw in enumerate(document["pods"]):
        where = f"{source}: pods[{index}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be a JSON object")
        uid = _str(raw, "uid", where).strip()
        if not uid:
            raise ConfigError(f"{where}: uid: required (the pod UID as in its cgroup path)")
        labels = raw.get("labels") or {}
        if not isinstance(labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ConfigError(f"{where}: labels: must be an object of string to string")
        containers: list[Container] = []
        for ci, craw in enumerate(raw.get("containers") or []):
            cwhere = f"{where}: containers[{ci}]"
            if not isinstance(craw, Mapping):
                raise ConfigError(f"{cwhere}: must be a JSON object")
            cid = _str(craw, "id", cwhere)
            if not cid:
                raise ConfigError(f"{cwhere}: id: required (the 64-hex container ID)")
            containers.append(Container(cid, _str(craw, "name", cwhere),
                                        _str(craw, "image", cwhere)))
        pods.append(Pod(
            uid=uid,
            namespace=_str(raw, "namespace", where),
            service_account=_str(raw, "service_account", where),
            name=_str(raw, "name", where),
            node_name=_str(raw, "node_name", where),
            labels=tuple(sorted(labels.items())),
            containers=tuple(containers),
        ))
    return PodList(tuple(pods))


def load_pods(path: str | Path) -> PodList:
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read pods file {path}: {exc.strerror}",
                          "check the --pods path") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}", "fix the JSON syntax") from None
    return parse_pods(document, source=str(path))
