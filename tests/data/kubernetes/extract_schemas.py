"""Writes schemas.json: the Kubernetes JSON schemas of the kinds in deploy/kubernetes/, each with
only the definitions it reaches, so the manifests validate offline (`make`-free, no download).

Source: the strict schemas that the `kubernetes-validate` package ships (Apache-2.0), generated
from Kubernetes' OpenAPI spec. Rerun after `pip install kubernetes-validate` to update:
`python tests/data/kubernetes/extract_schemas.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from importlib_resources import files

VERSION = "v1.37.0-local-strict"
KINDS = {
    "Deployment": "deployment-apps-v1.json",
    "Service": "service-v1.json",
    "PersistentVolumeClaim": "persistentvolumeclaim-v1.json",
    "NetworkPolicy": "networkpolicy-networking-v1.json",
    # not a kind: the pod templates of a LeaderWorkerSet (a custom resource) are checked with it
    "PodTemplateSpec": "podtemplatespec-v1.json",
}
_REF_PREFIXES = ("/api/_definitions.json#/$defs/", "#/$defs/")


def _definition_name(ref: str) -> str:
    for prefix in _REF_PREFIXES:
        if ref.startswith(prefix):
            return ref.removeprefix(prefix)
    raise ValueError(f"unexpected $ref {ref!r}")


def _refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {_definition_name(node["$ref"])} if "$ref" in node else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def _local_refs(node: object) -> object:
    if isinstance(node, dict):
        return {
            key: f"#/$defs/{_definition_name(value)}" if key == "$ref" else _local_refs(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_local_refs(value) for value in node]
    return node


def standalone(schema: dict, definitions: dict) -> dict:
    reached: set[str] = set()
    pending = _refs(schema)
    while pending:
        name = pending.pop()
        reached.add(name)
        pending |= _refs(definitions[name]) - reached
    out = {key: value for key, value in schema.items() if key != "$id"}
    out["$defs"] = {name: definitions[name] for name in sorted(reached)}
    return _local_refs(out)


def main() -> None:
    root = files("kubernetes_validate") / "kubernetes-json-schema" / VERSION
    definitions = json.loads((root / "_definitions.json").read_text())["$defs"]
    schemas = {
        kind: standalone(json.loads((root / name).read_text()), definitions)
        for kind, name in KINDS.items()
    }
    out = Path(__file__).with_name("schemas.json")
    out.write_text(json.dumps({"version": VERSION, "schemas": schemas}, separators=(",", ":")))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
