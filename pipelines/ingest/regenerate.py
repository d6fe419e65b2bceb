"""Rebuild a past ingest from its manifest: same inputs (checked by checksum), same config, same selection."""

from __future__ import annotations

from collections.abc import Callable

from pipelines.common.errors import StageError
from pipelines.common.files import code_version, file_sha256, read_json
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.stage import READABLE_VERSIONS


def load_manifest(path: str) -> dict:
    manifest = read_json(path, "manifest")
    if manifest.get("manifest_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"manifest {path} has version {manifest.get('manifest_version')}; "
            f"this code reads {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return manifest


def check_inputs(manifest: dict, manifest_path: str) -> list[str]:
    """The recorded input files, after proving each still has the recorded bytes."""
    paths = []
    for entry in manifest["inputs"]:
        try:
            actual = file_sha256(entry["path"])
        except FileNotFoundError:
            raise FileNotFoundError(
                f"input {entry['path']} recorded in manifest {manifest_path} no longer exists"
            ) from None
        if actual != entry["sha256"]:
            raise ValueError(
                f"input {entry['path']} changed since manifest {manifest_path} was written "
                f"(sha256 {actual[:12]}…, recorded {entry['sha256'][:12]}…); "
                "the selection cannot be reproduced"
            )
        paths.append(entry["path"])
    return paths


def compare(original: dict, rebuilt: dict, progress: Callable[[str], None]) -> None:
    """The selection must match exactly; the kept set may differ only if the web changed in between."""
    if rebuilt["selection"]["sha256"] != original["selection"]["sha256"]:
        raise StageError(
            "regenerated selection differs from the manifest's "
            f"({rebuilt['selection']['rows']} rows vs {original['selection']['rows']}): "
            "same inputs and config "
            "should select the same rows; check code_version "
            f"{original['code_version']} → {rebuilt['code_version']}"
        )
    if rebuilt["kept_keys_sha256"] == original["kept_keys_sha256"]:
        progress(
            f"ingest: regenerate: same selection and same {rebuilt['counts']['buckets']['kept']} kept keys"
        )
    else:
        progress(
            "ingest: regenerate: same selection; the kept keys differ "
            f"({rebuilt['counts']['buckets']['kept']} now vs {original['counts']['buckets']['kept']}): "
            "some URLs answer differently than when the manifest was written"
        )
    if original["code_version"] != code_version():
        progress(
            f"ingest: regenerate: note: code version was {original['code_version']}, now {code_version()}"
        )


def config_of(manifest: dict) -> IngestConfig:
    return IngestConfig.from_dict(manifest["config"])
