"""Every file in cluster/ and experiments/ parses and validates: `ray up` files against Ray's cluster-launcher
schema, KubeRay resources against the ray.io/v1 keys (transcribed from KubeRay's Go types) and the Kubernetes
pod keys we use, the inline Serve config with Ray's and t2ray's schemas, each experiment with its own model.

The cluster files also ship secure: Ray's token authentication (RAY_AUTH_MODE=token, Ray >= 2.52) on every node
and every KubeRay resource (authOptions, KubeRay >= 1.5.1), one token distributed 0600, the serving key from a
Kubernetes Secret, and the SVD/model cache ($T2RAY_CACHE) on the shared storage every node mounts."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))
EXPERIMENT_FILES = sorted((ROOT / "experiments").rglob("*.yaml"))
SHARED_CACHE = "/mnt/shared/t2ray-cache"  # $T2RAY_CACHE on clusters: on the shared mount, computed once
# KubeRay's ValidateRayClusterSpec: "authOptions.mode is 'token' but minimum Ray version is 2.52.0"
TOKEN_AUTH_MIN_RAY = (2, 52, 0)

# ---- KubeRay ray.io/v1 (ray-operator/apis/ray/v1/*_types.go): the keys each object may have
RAY_CLUSTER_SPEC = {
    "authOptions",
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
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}  # AuthOptions; mode is KubeRay >= 1.5.1
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
    if "authOptions" in spec:
        only(spec["authOptions"], AUTH_OPTIONS, f"{where}.authOptions")
        assert spec["authOptions"].get("mode", "token") in ("token", "disabled"), f"{where}.authOptions.mode"
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
    if path.name.startswith(("reproduce-", "paper-")):
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


# ---- secure as shipped: token authentication, the serving key, the shared SVD cache


def shell_commands(line: str) -> list[list[str]]:
    """A shell line as its simple commands (split at ; && || |), each as its words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if set(word) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def ray_starts(commands: list[list[str]]) -> list[tuple[dict[str, str], list[str]]]:
    """The environment (earlier `export`s, VAR=value prefixes) and the arguments of each `ray start` in `commands`."""
    env: dict[str, str] = {}
    found = []
    for words in commands:
        if words[0] == "export":
            env.update(w.split("=", 1) for w in words[1:] if ASSIGNMENT.match(w))
            continue
        n = next((i for i, w in enumerate(words) if not ASSIGNMENT.match(w)), len(words))
        if words[n : n + 2] == ["ray", "start"]:
            found.append(({**env, **dict(w.split("=", 1) for w in words[:n])}, words[n + 2 :]))
    return found


def ray_start(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    """The one `ray start` of a list of shell lines (a `*_start_ray_commands` list)."""
    found = ray_starts([words for line in lines for words in shell_commands(line)])
    assert len(found) == 1, f"expected one `ray start` in {lines}, found {len(found)}"
    return found[0]


def bashrc_exports(lines: list[str]) -> dict[str, str]:
    """What `echo 'export VAR=value' >> ~/.bashrc` lines add to every shell on the node."""
    env = {}
    for line in lines:
        for words in shell_commands(line):
            if words[0] == "echo" and words[-2:] == [">>", "~/.bashrc"]:
                for w in shlex.split(" ".join(words[1:-2]))[1:]:
                    env.update([w.split("=", 1)])
    return env


def home(path: str, user: str) -> str:
    return f"/home/{user}/{path[2:]}" if path.startswith("~/") else path


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_ray_up_files_start_every_node_with_token_auth(path):
    config = yaml.safe_load(path.read_text())
    user = config["auth"]["ssh_user"]
    head_env, head_args = ray_start(config["head_start_ray_commands"])
    worker_env, worker_args = ray_start(config["worker_start_ray_commands"])
    assert "--head" in head_args and not any(a.startswith("--address") for a in head_args)
    assert any(a.startswith("--address=") for a in worker_args)
    for who, env in (("head", head_env), ("workers", worker_env)):
        assert env.get("RAY_AUTH_MODE") == "token", f"{path.name}: {who} start without RAY_AUTH_MODE=token"
    assert "--dashboard-host=127.0.0.1" in head_args  # reached through `ray dashboard`'s SSH tunnel only

    # one token for every node: the launching machine's, by file_mounts (workers get the head's copy) ...
    token_path = f"/home/{user}/.ray/auth_token"
    assert config["file_mounts"].get(token_path) == "~/.ray/auth_token", f"{path.name}: the token is not mounted"
    # ... readable by its owner only, on every node (setup_commands run on head and workers)
    modes = {
        home(target, user): words[1]
        for line in config["setup_commands"]
        for words in shell_commands(line)
        if words[0] == "chmod"
        for target in words[2:]
    }
    assert modes.get(token_path) in ("600", "0600"), f"{path.name}: the token is not made 0600 ({modes})"
    assert modes.get(f"/home/{user}/.ray") in ("700", "0700")
    # drivers started in a shell on the node (ray attach / ray exec) are in token mode too
    assert bashrc_exports(config["setup_commands"]).get("RAY_AUTH_MODE") == "token"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_ray_up_files_put_the_svd_cache_on_the_shared_mount(path):
    config = yaml.safe_load(path.read_text())
    mounts = [
        words[-1]
        for line in config["initialization_commands"]
        for words in shell_commands(line)
        if "mount" in words and "-t" in words and words[words.index("-t") + 1].startswith("nfs")
    ]
    assert mounts == ["/mnt/shared"], mounts
    assert SHARED_CACHE.startswith(mounts[0] + "/")
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        env, _ = ray_start(config[commands])
        assert env.get("T2RAY_CACHE") == SHARED_CACHE, f"{path.name}: {commands} without the shared T2RAY_CACHE"
    assert bashrc_exports(config["setup_commands"]).get("T2RAY_CACHE") == SHARED_CACHE


CLUSTER_SPEC_OF = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}


def ray_cluster_specs(path: Path) -> list[tuple[str, dict]]:
    out = []
    for doc in docs(path):
        if doc["kind"] in CLUSTER_SPEC_OF:
            key = CLUSTER_SPEC_OF[doc["kind"]]
            out.append((doc["kind"], doc["spec"][key] if key else doc["spec"]))
    return out


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def version(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text)
    assert match, f"rayVersion {text!r} is not MAJOR.MINOR.PATCH"
    return tuple(int(g) for g in match.groups())


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_every_kuberay_cluster_uses_token_auth(path):
    specs = ray_cluster_specs(path)
    assert specs, f"{path.name}: no Ray cluster"
    for kind, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", f"{path.name} {kind}: authOptions mode not token"
        assert version(spec["rayVersion"]) >= TOKEN_AUTH_MIN_RAY, f"{kind}: token auth needs Ray >= 2.52.0"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", "head exposed outside the cluster"
        for template in pod_templates(spec):
            for c in template["spec"]["containers"]:
                # the operator sets both from its Secret, and leaves alone a variable the pod already sets
                assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env_of(c)), f"{kind} {c['name']} overrides auth"


@pytest.fixture(scope="module")
def rwx_claims() -> set[str]:
    return {
        d["metadata"]["name"]
        for d in docs(CLUSTER / "kuberay" / "raycluster.yaml")
        if d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"]
    }


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_every_kuberay_pod_has_the_svd_cache_on_the_shared_volume(path, rwx_claims):
    for kind, spec in ray_cluster_specs(path):
        for template in pod_templates(spec):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for c in template["spec"]["containers"]:
                cache = env_of(c).get("T2RAY_CACHE", {}).get("value")
                assert cache == SHARED_CACHE, f"{path.name} {kind} {c['name']}: T2RAY_CACHE={cache!r}"
                shared = [
                    m
                    for m in c.get("volumeMounts", [])
                    if cache.startswith(m["mountPath"].rstrip("/") + "/")
                    and volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") in rwx_claims
                ]
                assert shared, f"{path.name} {kind} {c['name']}: {cache} is not on a ReadWriteMany claim"


def test_rayservice_takes_its_api_key_from_a_secret():
    (service,) = [d for d in docs(CLUSTER / "kuberay" / "rayservice.yaml") if d["kind"] == "RayService"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    key_env = app["args"].get("api_key_env", "T2RAY_API_KEY")  # ServeArgs' default
    assert key_env == "T2RAY_API_KEY"
    assert app["args"].get("require_api_key") is True, "without the key the Dispatcher must refuse to start"
    for template in pod_templates(service["spec"]["rayClusterConfig"]):
        for c in template["spec"]["containers"]:
            var = env_of(c).get(key_env)
            assert var and "value" not in var, f"{c['name']}: {key_env} missing or inline"
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] and not ref.get("optional", False), f"{c['name']}: {ref}"


def readme_commands() -> list[list[str]]:
    """The simple commands of cluster/README.md's bash blocks (continued lines joined, `ssh host '...'` opened)."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        for words in shell_commands(line):
            commands.append(words)
            if words[0] == "ssh" and len(words) > 2:
                commands.extend(shell_commands(words[-1]))
    return commands


def test_readme_shows_the_token_setup():
    text = (CLUSTER / "README.md").read_text()
    commands = readme_commands()
    assert ["ray", "get-auth-token", "--generate"] in commands
    # RAY_AUTH_MODE=token on the `ray start` line itself (an `export` elsewhere in the README doesn't count)
    starts = [s for words in commands for s in ray_starts([words]) if s[0].get("RAY_AUTH_MODE") == "token"]
    assert any("--head" in args for _, args in starts), "no token-mode `ray start --head`"
    assert any(a.startswith("--address") for _, args in starts for a in args), "no token-mode worker `ray start`"
    # t2ray's CLI finds and sends the token by itself; Ray's own `ray job submit` sends it only in token mode
    assert ["export", "RAY_AUTH_MODE=token"] in commands and ["ray", "job", "submit"] in [w[:3] for w in commands]
    for needed in (
        "~/.ray/auth_token",
        "RAY_AUTH_TOKEN",
        "authOptions",
        "T2RAY_API_KEY",
        f"T2RAY_CACHE={SHARED_CACHE}",
    ):
        assert needed in text, f"cluster/README.md does not mention {needed}"
