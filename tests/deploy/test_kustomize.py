"""The offline renderer (tests/deploy/kustomize.py): it fails loudly outside its subset, and
where kubectl is installed its output equals `kubectl kustomize` for every kustomization."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kustomize import KustomizeError, build, config_map_hash, resource_id
from tests.deploy.test_manifests import EXTRA_BUILDS, KUSTOMIZATIONS, write_extra_build


def write(directory: Path, files: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else yaml.safe_dump_all(
            content if isinstance(content, list) else [content])
        (directory / name).write_text(text)
    return directory


def daemonset(**container: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "ns"},
            "spec": {"template": {"spec": {
                "containers": [{"name": "agent", "image": "x", **container}],
                "volumes": [{"name": "config", "configMap": {"name": "config"}}]}}}}


def patch_of(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "ns"},
            "spec": {"template": {"spec": spec}}}


def test_hash_suffix_matches_kustomize() -> None:
    # kubectl kustomize (kustomize v5.5.0) names this generator output x-kbhbh2kd5c.
    assert config_map_hash({"data": {"k": "a: 1\n"}}) == "kbhbh2kd5c"


def test_patch_merges_lists_by_key_patch_items_first(tmp_path: Path) -> None:
    write(tmp_path, {
        "ds.yaml": daemonset(env=[{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]),
        "patch.yaml": patch_of({"containers": [{"name": "agent", "env": [
            {"name": "C", "value": "3"}, {"name": "B", "value": "two"}]}]}),
        "kustomization.yaml": {"resources": ["ds.yaml"], "patches": [{"path": "patch.yaml"}]},
    })
    [ds] = build(tmp_path)
    env = ds["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "C", "value": "3"}, {"name": "B", "value": "two"},
                   {"name": "A", "value": "1"}]


def test_generated_config_map_is_hashed_and_referenced(tmp_path: Path) -> None:
    write(tmp_path, {
        "ds.yaml": daemonset(), "config.txt": "a: 1\n",
        "kustomization.yaml": {"resources": ["ds.yaml"], "configMapGenerator": [
            {"name": "config", "namespace": "ns", "files": ["k=config.txt"]}]},
    })
    ds, config_map = build(tmp_path)
    assert config_map["metadata"] == {"name": "config-kbhbh2kd5c", "namespace": "ns"}
    assert ds["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == (
        "config-kbhbh2kd5c")


@pytest.mark.parametrize(("files", "message"), [
    ({"kustomization.yaml": {"resources": ["ds.yaml"], "namePrefix": "x-"}},
     "not supported"),
    ({"kustomization.yaml": {"resources": ["../outside.yaml"]}}, "not in or below"),
    ({"kustomization.yaml": {"resources": ["https://example.org/x.yaml"]}}, "local paths"),
    ({"kustomization.yaml": {"resources": ["ds.yaml", "ds.yaml"]}}, "already registered"),
    ({"kustomization.yaml": {"resources": ["ds.yaml"], "patches": [
        {"path": "p.yaml", "target": {"kind": "DaemonSet"}}]}}, "only `patches"),
    ({"p.yaml": {**patch_of({}), "metadata": {"name": "other", "namespace": "ns"}},
      "kustomization.yaml": {"resources": ["ds.yaml"], "patches": [{"path": "p.yaml"}]}},
     "matches 0 resources"),
    ({"p.yaml": patch_of({"containers": [{"name": "agent", "args": ["b"]}]}),
      "kustomization.yaml": {"resources": ["ds.yaml"], "patches": [{"path": "p.yaml"}]}},
     "merge key"),
    ({"p.yaml": patch_of({"$patch": "replace"}),
      "kustomization.yaml": {"resources": ["ds.yaml"], "patches": [{"path": "p.yaml"}]}},
     "directives"),
    ({"kustomization.yaml": {"resources": ["ds.yaml"], "configMapGenerator": [
        {"name": "c", "literals": ["a=b"]}]}}, "configMapGenerator supports only"),
    ({"kustomization.yaml": {"resources": ["ds.yaml"], "components": ["."]}}, "Component"),
    ({"kustomization.yaml": {"resources": ["/etc"]}}, "cannot be absolute"),
])
def test_unsupported_or_invalid_input_fails_loudly(tmp_path: Path, files: dict[str, Any],
                                                   message: str) -> None:
    write(tmp_path, {"outside.yaml": daemonset()})
    write(tmp_path / "k", {"ds.yaml": daemonset(args=["a"]), **files})
    with pytest.raises(KustomizeError, match=message):
        build(tmp_path / "k")


def test_a_symlink_out_of_the_kustomization_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"outside.yaml": daemonset()})
    write(tmp_path / "k", {"kustomization.yaml": {"resources": ["ds.yaml"]}})
    (tmp_path / "k" / "ds.yaml").symlink_to(tmp_path / "outside.yaml")
    with pytest.raises(KustomizeError, match="not in or below"):
        build(tmp_path / "k")


# --- the real thing ---------------------------------------------------------------------

def kubectl_kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the renderer is checked against it where it is)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("name", [*KUSTOMIZATIONS, *EXTRA_BUILDS])
def test_renderer_agrees_with_kubectl_kustomize(name: str, tmp_path: Path) -> None:
    directory = (write_extra_build(tmp_path, name) if name in EXTRA_BUILDS
                 else KUSTOMIZATIONS[name])
    theirs = kubectl_kustomize(directory)
    mine = build(directory)
    key = resource_id
    assert sorted(map(key, mine)) == sorted(map(key, theirs))
    by_id = {key(r): r for r in theirs}
    for resource in mine:
        assert resource == by_id[key(resource)], key(resource)
