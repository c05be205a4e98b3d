"""A tiny, deterministic OCI image layout on disk, for skopeo to push to the demo registry."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

OCI_LAYOUT_VERSION = "1.0.0"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

DEFAULT_FILES: Mapping[str, bytes] = {"hello.txt": b"hello from spiffe-delegate\n"}

# The distribution spec's grammar for tags and repository names.
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


@dataclass(frozen=True)
class OciImage:
    """An image written by :func:`build_oci_layout`; digests are ``sha256:<hex>``."""

    layout: Path
    tag: str
    manifest_digest: str
    manifest_media_type: str
    manifest: bytes
    blob_digests: tuple[str, ...]  # config first, then layers


def build_oci_layout(directory: Path, *, tag: str = "1.0",
                     files: Mapping[str, bytes] | None = None) -> OciImage:
    """Writes an OCI image layout with one gzip layer holding ``files`` into ``directory``.

    The result depends only on ``tag`` and ``files``: tar entries have mtime 0 and owner
    0:0, the gzip header carries no time stamp and the JSON documents are canonical, so the
    same input always yields the same digests. ``index.json`` is replaced, blobs are added.
    """
    if not TAG.fullmatch(tag):
        raise ValueError(f"invalid image tag {tag!r}: use letters, digits, '_', '.' and '-', "
                         "at most 128 characters, not starting with '.' or '-'")
    layer_tar = _tar(DEFAULT_FILES if files is None else files)
    layer = gzip.compress(layer_tar, compresslevel=9, mtime=0)
    config = _canonical({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
    })
    manifest = _canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": _descriptor(CONFIG_MEDIA_TYPE, config),
        "layers": [_descriptor(LAYER_MEDIA_TYPE, layer)],
    })
    index = _canonical({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            **_descriptor(MANIFEST_MEDIA_TYPE, manifest),
            "annotations": {REF_NAME_ANNOTATION: tag},
        }],
    })

    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for blob in (config, layer, manifest):
        (blobs / _digest(blob).removeprefix("sha256:")).write_bytes(blob)
    (directory / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    # index.json last: a reader that sees it finds every blob it names.
    (directory / "index.json").write_bytes(index)
    return OciImage(
        layout=directory,
        tag=tag,
        manifest_digest=_digest(manifest),
        manifest_media_type=MANIFEST_MEDIA_TYPE,
        manifest=manifest,
        blob_digests=(_digest(config), _digest(layer)),
    )


def _tar(files: Mapping[str, bytes]) -> bytes:
    entries: dict[str, bytes | None] = {}  # None marks a directory
    for name, content in files.items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or str(path) == ".":
            raise ValueError(f"invalid file name {name!r} for an image layer: use a relative "
                             "path without '..'")
        if str(path) in entries:
            raise ValueError(f"file {name!r} is given twice")
        entries[str(path)] = bytes(content)
    for name in list(entries):
        for parent in PurePosixPath(name).parents[:-1]:
            if entries.setdefault(str(parent), None) is not None:
                raise ValueError(f"{str(parent)!r} is both a file and a directory in the layer")

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            data = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(blob), "size": len(blob)}
