"""The multi-node manifests (deploy/kubernetes/multinode, no cluster): the LeaderWorkerSet against
its API's schema and its pod templates against Kubernetes' PodTemplateSpec, the other manifests
against Kubernetes' schemas, the "restricted" Pod Security Standard, LeaderWorkerSet's variables
mapped onto the launcher's flags (through its own parser), the token Secret, the Service and the
NetworkPolicy."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from shardline.cluster_token import TOKEN_ENV
from shardline.launcher.args import parse_args
from tests.test_deploy import (
    LIVENESS_PATH,
    READINESS_PATH,
    SCHEMAS,
    restricted_violations,
    schema_errors,
)

REPO = Path(__file__).resolve().parent.parent
MULTINODE = REPO / "deploy" / "kubernetes" / "multinode"
KUSTOMIZATION = yaml.safe_load((MULTINODE / "kustomization.yaml").read_text())
LWS_SCHEMA = json.loads(
    (Path(__file__).parent / "data" / "kubernetes" / "leaderworkerset.schema.json").read_text()
)
LEADER_ADDRESS = "shardline-multinode-0.shardline-multinode.default"
ROLES = ("leaderTemplate", "workerTemplate")


def manifests() -> list[dict]:
    paths = [MULTINODE / name for name in KUSTOMIZATION["resources"]]
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def kind(name: str) -> dict:
    return next(m for m in manifests() if m["kind"] == name)


def template(role: str) -> dict:
    return kind("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"][role]


def container(role: str) -> dict:
    return template(role)["spec"]["containers"][0]


def lws_errors(lws: dict) -> list[str]:
    """The LeaderWorkerSet's own fields against its schema, each pod template against
    Kubernetes' PodTemplateSpec."""
    errors = jsonschema.Draft202012Validator(LWS_SCHEMA).iter_errors(lws)
    found = [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    pod_template = jsonschema.Draft202012Validator(SCHEMAS["schemas"]["PodTemplateSpec"])
    for role in ROLES:
        pod = lws["spec"]["leaderWorkerTemplate"].get(role, {})
        found += [
            f"{role} {list(e.absolute_path)}: {e.message}" for e in pod_template.iter_errors(pod)
        ]
    return found


def test_the_kustomization_lists_every_manifest() -> None:
    others = {path.name for path in MULTINODE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(KUSTOMIZATION["resources"]) == sorted(others)


@pytest.mark.parametrize(
    "manifest", manifests(), ids=lambda m: f"{m['kind']}/{m['metadata']['name']}"
)
def test_manifest_matches_its_schema(manifest: dict) -> None:
    if manifest["kind"] == "LeaderWorkerSet":
        assert lws_errors(manifest) == []
    else:
        assert schema_errors(manifest) == []


def test_the_schema_check_catches_a_broken_leaderworkerset() -> None:
    lws = copy.deepcopy(kind("LeaderWorkerSet"))
    lws["spec"]["leaderWorkerTemplate"]["size"] = "two"
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["pth"] = "/"
    errors = lws_errors(lws)
    assert any("'two' is not of type" in error for error in errors)
    assert any("'Always' is not one of" in error for error in errors)
    assert any(error.startswith("workerTemplate") and "'pth'" in error for error in errors)


@pytest.mark.parametrize("role", ROLES)
def test_the_pods_meet_the_restricted_pod_security_standard(role: str) -> None:
    assert restricted_violations(template(role)["spec"]) == []


def launcher_args(role: str, worker_index: int):
    """The launcher's settings in a pod of `role`, LeaderWorkerSet's variables expanded."""
    spec = container(role)
    lws = {
        "LWS_LEADER_ADDRESS": LEADER_ADDRESS,
        "LWS_GROUP_SIZE": str(kind("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["size"]),
        "LWS_WORKER_INDEX": str(worker_index),
    }
    argv = [re.sub(r"\$\((\w+)\)", lambda m: lws[m.group(1)], arg) for arg in spec["args"]]
    env = {item["name"]: item["value"] for item in spec["env"] if "value" in item}
    return parse_args(argv, {**env, "CUDA_VISIBLE_DEVICES": ""})


def test_leaderworkerset_variables_map_onto_the_node_flags() -> None:
    size = kind("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["size"]
    leader = launcher_args("leaderTemplate", 0)
    workers = [launcher_args("workerTemplate", index) for index in range(1, size)]
    assert (leader.node_rank, leader.nnodes, leader.master_addr) == (0, size, LEADER_ADDRESS)
    assert [w.node_rank for w in workers] == list(range(1, size))
    for args in [leader, *workers]:
        assert (args.nnodes, args.master_addr) == (size, LEADER_ADDRESS)
        assert (args.master_port, args.num_shard) == (leader.master_port, leader.num_shard)
        assert args.model_id == leader.model_id
        assert args.pipeline_parallel_size == leader.pipeline_parallel_size
    assert (leader.num_shard * size) % leader.pipeline_parallel_size == 0
    for role in ROLES:
        assert int(container(role)["resources"]["limits"]["nvidia.com/gpu"]) == leader.num_shard


@pytest.mark.parametrize("role", ROLES)
def test_every_pod_has_the_cluster_token_from_a_secret(role: str) -> None:
    token = next(item for item in container(role)["env"] if item["name"] == TOKEN_ENV)
    reference = token["valueFrom"]["secretKeyRef"]
    assert reference["name"] == "shardline-cluster-token" and not reference.get("optional")


def test_the_leader_serves_and_is_probed_on_http() -> None:
    leader = container("leaderTemplate")
    args = launcher_args("leaderTemplate", 0)
    port = next(p for p in leader["ports"] if p["name"] == "http")
    assert (args.hostname, args.port) == ("0.0.0.0", port["containerPort"])
    for probe in ("startupProbe", "readinessProbe"):
        assert leader[probe]["httpGet"] == {"path": READINESS_PATH, "port": "http"}
    assert leader["livenessProbe"]["httpGet"] == {"path": LIVENESS_PATH, "port": "http"}
    assert not any(port["name"] == "http" for port in container("workerTemplate")["ports"])


def test_the_service_selects_the_leaders_alone() -> None:
    service, lws = kind("Service"), kind("LeaderWorkerSet")
    selector = service["spec"]["selector"]
    assert selector == {
        "leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"],
        "leaderworkerset.sigs.k8s.io/worker-index": "0",
    }
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_the_network_policy_keeps_the_group_ports_inside_the_group() -> None:
    policy, lws = kind("NetworkPolicy"), kind("LeaderWorkerSet")
    group = {"leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"]}
    assert policy["spec"]["podSelector"]["matchLabels"] == group
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    from_group, from_anyone = policy["spec"]["ingress"]
    assert from_group == {"from": [{"podSelector": {"matchLabels": group}}]}
    assert from_anyone == {"ports": [{"port": "http", "protocol": "TCP"}]}
