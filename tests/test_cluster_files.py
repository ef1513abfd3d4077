"""Every file in cluster/ and experiments/ parses and validates: `ray up` files against Ray's cluster-launcher
schema, KubeRay resources against the ray.io/v1 keys (transcribed from KubeRay's Go types) and the Kubernetes
pod keys we use, the inline Serve config with Ray's and t2ray's schemas, each experiment with its own model."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))
EXPERIMENT_FILES = sorted((ROOT / "experiments").rglob("*.yaml"))

# ---- KubeRay ray.io/v1 (ray-operator/apis/ray/v1/*_types.go): the keys each object may have
RAY_CLUSTER_SPEC = {
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
WORKER_GROUP_REQUIRED = {"groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"}
AUTOSCALER_OPTIONS = {
    "resources",
    "image",
    "imagePullPolicy",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "env",
    "envFrom",
    "volumeMounts",
}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionPolicy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}
RAY_SERVICE_SPEC = {
    "serveConfigV2",
    "rayClusterConfig",
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
    "serveService",
    "upgradeStrategy",
    "excludeHeadPodFromServeSvc",
}
# ---- Kubernetes core/v1 keys used in the pod templates (a subset of PodSpec / Container)
POD_TEMPLATE = {"metadata", "spec"}
POD_SPEC = {
    "containers",
    "volumes",
    "tolerations",
    "nodeSelector",
    "affinity",
    "serviceAccountName",
    "imagePullSecrets",
    "initContainers",
    "securityContext",
    "priorityClassName",
    "runtimeClassName",
}
CONTAINER = {
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "ports",
    "env",
    "envFrom",
    "resources",
    "volumeMounts",
    "lifecycle",
    "securityContext",
    "readinessProbe",
    "livenessProbe",
    "workingDir",
}
QUANTITY = re.compile(r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def only(keys: dict, allowed: set[str], where: str) -> None:
    unknown = set(keys) - allowed
    assert not unknown, f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})"


def check_pod_template(template: dict, where: str, claims: set[str]) -> list[dict]:
    only(template, POD_TEMPLATE, where)
    spec = template["spec"]
    only(spec, POD_SPEC, f"{where}.spec")
    names = [c["name"] for c in spec["containers"]]
    assert len(names) == len(set(names)), f"{where}: duplicate container names"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        only(c, CONTAINER, f"{where}.containers[{c['name']}]")
        assert c["image"], f"{where}: container {c['name']} has no image"
        for kind in ("requests", "limits"):
            for res, qty in c.get("resources", {}).get(kind, {}).items():
                assert QUANTITY.match(str(qty)), f"{where}: {kind}.{res}={qty!r} is not a Kubernetes quantity"
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: volumeMount {mount['name']} has no volume"
    for v in volumes.values():
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in claims, f"{where}: unknown claim {v}"
    return spec["containers"]


def check_ray_cluster_spec(spec: dict, where: str, claims: set[str]) -> dict:
    only(spec, RAY_CLUSTER_SPEC, where)
    assert spec["rayVersion"] == "2.60.0", f"{where}: rayVersion should match the Ray t2ray is tested with"
    if "autoscalerOptions" in spec:
        only(spec["autoscalerOptions"], AUTOSCALER_OPTIONS, f"{where}.autoscalerOptions")
    head = spec["headGroupSpec"]
    only(head, HEAD_GROUP, f"{where}.headGroupSpec")
    assert HEAD_GROUP_REQUIRED <= set(head), f"{where}.headGroupSpec needs {HEAD_GROUP_REQUIRED}"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    containers = check_pod_template(head["template"], f"{where}.headGroupSpec.template", claims)
    ports = {p["name"]: p["containerPort"] for p in containers[0].get("ports", [])}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379
    groups = spec.get("workerGroupSpecs", [])
    assert groups, f"{where}: no GPU worker group"
    for g in groups:
        gw = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        only(g, WORKER_GROUP, gw)
        assert WORKER_GROUP_REQUIRED <= set(g), f"{gw} needs {WORKER_GROUP_REQUIRED}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], gw
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        for c in check_pod_template(g["template"], f"{gw}.template", claims):
            assert "nvidia.com/gpu" in c["resources"]["limits"], f"{gw}: GPU workers ask for nvidia.com/gpu"
    return spec


@pytest.fixture(scope="module")
def claims() -> set[str]:
    return {
        d["metadata"]["name"]
        for d in docs(CLUSTER / "kuberay" / "raycluster.yaml")
        if d["kind"] == "PersistentVolumeClaim"
    }


def test_the_expected_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    assert {
        "aws-gpu.yaml",
        "gcp-gpu.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/rayservice.yaml",
        "README.md",
        "Dockerfile",
    } <= names
    assert "torch==2.13.0" in (CLUSTER / "Dockerfile").read_text()


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_ray_up_files_validate_against_the_cluster_launcher_schema(path):
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(fillout_defaults(copy.deepcopy(config)))  # jsonschema of ray-schema.json + Ray's own checks
    provider = config["provider"]["type"]
    assert provider in ("aws", "gcp")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0  # nothing trains on the head
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    assert gpu_types, "no GPU worker type"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    for name, t in gpu_types.items():
        assert t.get("max_workers", 0) >= 1 and t.get("min_workers", 0) == 0, name  # autoscale from zero
        key = "InstanceType" if provider == "aws" else "machineType"
        assert t["node_config"][key], name
        if provider == "gcp":
            assert t["node_config"]["scheduling"][0]["onHostMaintenance"] == "TERMINATE"  # GPUs cannot migrate
    assert any(t["resources"].get("GPU") == 8 for t in types.values())  # the 8 × 80 GB nodes of the plan
    commands = " ".join(config["initialization_commands"])
    assert "/mnt/shared" in commands and "mount" in commands  # shared storage for checkpoints
    assert any("pip install" in c and "/t2ray" in c for c in config["setup_commands"])
    assert "--head" in " ".join(config["head_start_ray_commands"])
    assert "$RAY_HEAD_IP" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_files_use_only_ray_io_v1_keys(path, claims):
    kinds = []
    for doc in docs(path):
        kinds.append(doc["kind"])
        if doc["kind"] == "PersistentVolumeClaim":
            assert doc["apiVersion"] == "v1" and doc["spec"]["accessModes"] == ["ReadWriteMany"]
            continue
        assert doc["apiVersion"] == "ray.io/v1", path
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        spec = doc["spec"]
        if doc["kind"] == "RayCluster":
            check_ray_cluster_spec(spec, "RayCluster.spec", claims)
        elif doc["kind"] == "RayJob":
            check_ray_job(spec, claims)
        elif doc["kind"] == "RayService":
            check_ray_service(spec, claims)
        else:
            pytest.fail(f"{path}: unexpected kind {doc['kind']}")
    assert {"RayCluster", "RayJob", "RayService"} & set(kinds)


def check_ray_job(spec: dict, claims: set[str]) -> None:
    from t2ray.config import load_experiment

    only(spec, RAY_JOB_SPEC, "RayJob.spec")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"env_vars", "pip", "uv", "working_dir", "py_modules", "excludes", "conda"}
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec", claims)
    command, experiment = spec["entrypoint"].split()[:3][1:]
    assert spec["entrypoint"].startswith("t2ray train ") and command == "train"
    cfg = load_experiment(ROOT / experiment)  # the image's working dir is the repository (cluster/Dockerfile)
    gpus = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers <= gpus, "the job's cluster is too small"
    assert cfg.storage_path.startswith("/mnt/shared")


def check_ray_service(spec: dict, claims: set[str]) -> None:
    from ray.serve.schema import ServeDeploySchema

    only(spec, RAY_SERVICE_SPEC, "RayService.spec")
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray's own schema for serve config files
    apps = serve_config["applications"]
    assert [a["import_path"] for a in apps] == ["t2ray.serve.app:build_app"]
    try:
        from t2ray.serve.config import ServeArgs
    except ImportError:  # pragma: no cover - the serving layer is optional here
        pytest.skip("t2ray.serve is not importable")
    args = ServeArgs.model_validate(apps[0]["args"])  # t2ray's schema for the app's args (unknown keys named)
    assert all(p.startswith("/mnt/shared/") for p in args.experts.values())
    check_ray_cluster_spec(spec["rayClusterConfig"], "RayService.spec.rayClusterConfig", claims)


def kind_of(path: Path, data: dict) -> str:
    if path.name.startswith(("quickstart", "paper-")):
        return "quickstart"
    if "applications" in data:
        return "serve"
    if "space" in data:
        return "sweep"
    if "strategy" in data:
        return "adapt"
    return "experiment"


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.relative_to(ROOT / "experiments").as_posix())
def test_every_experiment_file_validates(path):
    from t2ray.config import AdaptConfig, load_experiment, read_yaml

    data = read_yaml(path)
    kind = kind_of(path, data)
    if kind == "experiment":
        load_experiment(path)
    elif kind == "quickstart":
        from t2ray.quickstart import QuickstartConfig

        QuickstartConfig.model_validate(data)
    elif kind == "sweep":
        from t2ray.tune import load_sweep

        load_sweep(path)
    elif kind == "adapt":
        AdaptConfig.model_validate(data)
    else:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(data)
        try:
            from t2ray.serve.config import ServeArgs
        except ImportError:  # pragma: no cover
            pytest.skip("t2ray.serve is not importable")
        for app in data["applications"]:
            if app.get("import_path") == "t2ray.serve.app:build_app":
                ServeArgs.model_validate(app.get("args", {}))


def test_readme_capacity_plan_matches_the_planner():
    from t2ray.plan import plan

    text = (CLUSTER / "README.md").read_text()
    small = plan("llama3-8b", gpus=1, gpu_mem_gb=80, zero=2)
    big = plan("llama3-70b", gpus=16, gpu_mem_gb=80, zero=3)
    assert small.fits and big.fits
    assert small.table() in text and big.table() in text  # regenerate the README if the planner changes
