"""The deploy files in infra/ (docker, ray, k8s, mlflow) checked against each other, against the pins and
against jobs/laion_5m.yaml: parsed, required fields present, image tags, paths, names and ports consistent.
The Ray cluster launcher config goes through Ray's own `prepare_config` and `validate_config` (what `ray up`
runs first); the RayJob entrypoints through the `infgen` command's own parser. No image is built here (no
docker, no network): the Dockerfile is checked as text, and check_models.py, which the build runs, is run."""

from __future__ import annotations

import configparser
import copy
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
INFRA = REPOSITORY / "infra"
IMAGE_REPOSITORY = "ghcr.io/infgen-project/infgen"
MLFLOW_IMAGE_REPOSITORY = "ghcr.io/infgen-project/infgen-mlflow"
PROJECT_DIRECTORY = "/opt/infgen"  # the image's WORKDIR, where the repository is copied


def _pins() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _project_version() -> str:
    import tomllib

    return tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["version"]


def _module(name: str, path: Path):
    """The Python file at `path` as a module, without importing the package around it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_models():
    """infra/docker/check_models.py, the script the image build runs (infra/ is not a package)."""
    return _module("check_models", INFRA / "docker" / "check_models.py")


def _mlflow_server_module(relative: str):
    """A module of mlflow/server/ by its file: importing it as `mlflow.server.…` would first run
    mlflow/server/__init__.py and mlflow/server/auth/__init__.py, which build the whole server app (~20 s)."""
    import mlflow

    return _module(
        f"mlflow_server_{relative.replace('/', '_')}", Path(mlflow.__file__).parent / "server" / relative
    )


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instruction, _, arguments = pending.strip().partition(" ")
        instructions.append((instruction.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load((REPOSITORY / "jobs" / "laion_5m.yaml").read_text())


def _stage_options(workflow: dict, command: str) -> list[dict]:
    return [stage["options"] for stage in workflow["stages"] if stage["command"] == command]


# --- the image -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _dockerfile(INFRA / "docker" / "Dockerfile")


def test_the_image_builds_on_a_cuda_base_that_matches_the_pinned_torch(dockerfile):
    import torch

    assert torch.__version__.split("+")[0] == _pins()["torch"], "the venv's torch is not the pinned one"
    bases = {args.split(" AS ")[1]: args.split(" AS ")[0] for instruction, args in dockerfile
             if instruction == "FROM" and " AS " in args}  # fmt: skip
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", bases["base-gpu"])
    assert cuda, f"the GPU variant's base is not a CUDA runtime image: {bases['base-gpu']}"
    assert torch.version.cuda == f"{cuda[1]}.{cuda[2]}", (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, the base image has "
        f"{cuda[1]}.{cuda[2]}"
    )
    assert bases["base-cpu"].split(":")[1] == bases["base-gpu"].rsplit("-", 1)[1].replace("ubuntu", "")


def test_every_install_in_the_image_uses_the_pinned_constraints(dockerfile):
    installs = [args for instruction, args in dockerfile if instruction == "RUN" and "pip install" in args]
    assert len(installs) >= 2
    for install in installs:
        assert "-c infra/constraints.txt" in install, install
    project = next(install for install in installs if "-e '.[" in install)
    extras = re.search(r"-e '\.\[([^\]]+)\]'", project)[1].split(",")
    assert extras == ["pipeline", "s3", "gcs"]
    import tomllib

    declared = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(declared), f"extras the image installs but pyproject.toml lacks: {extras}"
    assert ("COPY", "infra/constraints.txt infra/constraints.txt") in dockerfile
    assert ("WORKDIR", PROJECT_DIRECTORY) in dockerfile


def test_the_models_directory_holds_the_weights_the_cluster_workflow_names(dockerfile, workflow):
    check_models = _check_models()
    assert ("COPY", "--from=models . /models/") in dockerfile  # from --build-context models=DIR
    environment = dict(
        pair.split("=", 1)
        for instruction, args in dockerfile
        if instruction == "ENV"
        for pair in args.split()
    )
    (evaluation,) = _stage_options(workflow, "evaluate")
    assert environment["INFGEN_INCEPTION_WEIGHTS"] == evaluation["inception"]
    assert environment["INFGEN_LPIPS_TRUNK"] == evaluation["lpips-trunk"]
    assert environment["HF_HUB_OFFLINE"] == "1"
    vaes = {options["vae"] for options in _stage_options(workflow, "latents")}
    assert vaes == {f"/models/{check_models.VAE_DIRECTORY}"}
    assert evaluation["inception"] == f"/models/{check_models.INCEPTION_FILE}"
    assert evaluation["lpips-trunk"] == f"/models/{check_models.LPIPS_TRUNK_FILE}"
    assert ("RUN", "python infra/docker/check_models.py /models") in dockerfile


def test_the_build_time_model_check_names_every_missing_weight(tmp_path, capsys):
    check_models = _check_models()
    (tmp_path / check_models.VAE_DIRECTORY).mkdir()
    assert check_models.main([str(tmp_path)]) == 1
    errors = capsys.readouterr().err
    for name in (check_models.VAE_DIRECTORY, check_models.INCEPTION_FILE, check_models.LPIPS_TRUNK_FILE):
        assert str(tmp_path / name) in errors
    assert "config.json" in errors


def test_the_image_label_carries_the_project_version(dockerfile):
    labels = " ".join(args for instruction, args in dockerfile if instruction == "LABEL")
    assert f'org.opencontainers.image.version="{_project_version()}"' in labels


def test_dockerignore_keeps_local_state_out_and_the_project_in():
    patterns = [line.strip() for line in (REPOSITORY / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    for excluded in (".git", ".venv", "runs", "mlruns", "mlartifacts", ".cache"):
        assert excluded in patterns, f"{excluded} would be copied into the image"
    needed = ("infgen", "pipelines", "jobs", "pyproject.toml", "infra", "README.md")
    for pattern in patterns:
        assert pattern.split("/")[0] not in needed, f".dockerignore drops {pattern}, which the image needs"


# --- image tags across the cluster files -----------------------------------------------------------------


def _image_tags() -> dict[str, str]:
    """The tags docs/deploy.md builds (gpu, cpu), as the Dockerfile's header also shows them."""
    built = re.findall(
        rf"-t ({re.escape(IMAGE_REPOSITORY)}:\S+)", (REPOSITORY / "docs" / "deploy.md").read_text()
    )
    header = re.findall(
        rf"-t ({re.escape(IMAGE_REPOSITORY)}:\S+)", (INFRA / "docker" / "Dockerfile").read_text()
    )
    assert set(built) == set(header) and len(set(built)) == 2, (built, header)
    tags = {"cpu" if tag.endswith("-cpu") else "gpu": tag for tag in built}
    return tags


def test_image_tags_carry_the_project_version_and_the_cuda_version(dockerfile):
    import torch

    tags = _image_tags()
    cuda = "cu" + torch.version.cuda.replace(".", "")
    assert tags == {
        "gpu": f"{IMAGE_REPOSITORY}:{_project_version()}-{cuda}",
        "cpu": f"{IMAGE_REPOSITORY}:{_project_version()}-cpu",
    }


def test_every_cluster_file_names_a_built_image_gpu_groups_the_cuda_one():
    tags = _image_tags()
    referenced = set()
    for path in [INFRA / "ray" / "aws-a100.yaml", *sorted((INFRA / "k8s").rglob("*.yaml"))]:
        found = set(re.findall(rf"{re.escape(IMAGE_REPOSITORY)}:[\w.-]+", path.read_text()))
        assert found <= set(tags.values()), f"{path}: unknown image tags {found - set(tags.values())}"
        referenced |= found
    assert referenced == set(tags.values())


# --- the Ray cluster launcher config ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((INFRA / "ray" / "aws-a100.yaml").read_text())


def test_the_launcher_config_passes_rays_own_preparation_and_validation(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_the_launcher_validation_is_real_a_misspelt_field_fails_it(launcher):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu-a100"]["min_worker"] = broken["available_node_types"]["gpu-a100"].pop(
        "min_workers"
    )
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_the_launcher_cluster_has_an_idle_head_spot_ingest_and_8_gpu_a100_nodes(launcher):
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: node for name, node in types.items() if name != launcher["head_node_type"]}
    spot = [
        n
        for n in workers.values()
        if n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    assert len(spot) == 1 and not spot[0]["node_config"]["InstanceType"].startswith("p")
    (gpu,) = [
        n for n in workers.values() if n["node_config"]["InstanceType"] in ("p4d.24xlarge", "p4de.24xlarge")
    ]
    assert "InstanceMarketOptions" not in gpu["node_config"]  # on demand: training is not preempted
    tags = _image_tags()
    assert launcher["docker"]["image"] == gpu["docker"]["worker_image"] == tags["gpu"]
    assert launcher["docker"]["head_image"] == spot[0]["docker"]["worker_image"] == tags["cpu"]


def test_the_launcher_mounts_the_shared_filesystem_at_the_run_directory_and_spills_to_nvme(
    launcher, workflow
):
    volumes = [option for option in launcher["docker"]["run_options"] if option.startswith("--volume=")]
    mounts = dict(option.removeprefix("--volume=").split(":")[:2] for option in volumes)
    shared = "/mnt/infgen"
    assert workflow["run_dir"].startswith(shared + "/") and mounts[shared] == shared
    assert any(
        f" {shared}" in command and "mount" in command for command in launcher["initialization_commands"]
    )
    for command in launcher["head_start_ray_commands"][-1:] + launcher["worker_start_ray_commands"][-1:]:
        spill = re.search(r"--object-spilling-directory=(\S+)", command)
        assert spill, f"no object spilling directory in {command!r}"
        assert any(spill[1].startswith(host + "/") for host in mounts), f"{spill[1]} is not a mounted disk"
        assert "nvme" in spill[1]
    assert launcher["setup_commands"] == [] and launcher["head_setup_commands"] == []  # the image has it all


# --- KubeRay ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict]]:
    return {
        str(path.relative_to(INFRA / "k8s")): _documents(path)
        for path in sorted((INFRA / "k8s").rglob("*.yaml"))
    }


def _one(k8s, kind: str, name: str) -> dict:
    (found,) = [
        d
        for documents in k8s.values()
        for d in documents
        if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    return found


def _tracking(workflow) -> tuple[str, str, int]:
    """(service, namespace, port) of the workflow's tracking URI, http://SERVICE.NAMESPACE.svc:PORT."""
    address = urlparse(workflow["tracking_uri"])
    service, namespace, svc = address.hostname.split(".")
    assert svc == "svc"
    return service, namespace, address.port


def test_every_k8s_object_is_in_the_workflows_namespace(k8s, workflow):
    namespace = _tracking(workflow)[1]
    for path, documents in k8s.items():
        for document in documents:
            assert document.get("apiVersion") and document.get("kind"), path
            if document["kind"] != "Namespace":
                assert document["metadata"]["namespace"] == namespace, f"{path}: {document['metadata']}"
    assert _one(k8s, "Namespace", namespace)


def _groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def test_the_raycluster_has_an_idle_head_a_cpu_group_and_an_8_gpu_group_on_the_shared_volume(k8s):
    cluster = _one(k8s, "RayCluster", "infgen")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == _pins()["ray"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    tags = _image_tags()
    gpus = {}
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus[group["groupName"]] = limits.get("nvidia.com/gpu", 0)
        assert container["image"] == tags["gpu" if gpus[group["groupName"]] else "cpu"]
        if gpus[group["groupName"]]:
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert sorted(gpus.values()) == [0, 8]
    (claim,) = [d for d in k8s["storage.yaml"] if d["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for group in _groups(spec):
        pod = group["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        (container,) = pod["containers"]
        (runs,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/mnt/infgen"]
        assert volumes[runs["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_every_secret_the_ray_pods_read_is_in_the_example_secrets(k8s):
    secrets = {d["metadata"]["name"]: d["stringData"] for d in k8s["secrets.example.yaml"]}
    spec = _one(k8s, "RayCluster", "infgen")["spec"]
    assert (
        spec["authOptions"]["mode"] == "token" and "auth_token" in secrets[spec["authOptions"]["secretName"]]
    )
    names = set()
    for group in _groups(spec):
        for variable in group["template"]["spec"]["containers"][0]["env"]:
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference["key"] in secrets[reference["name"]], reference
            names.add(variable["name"])
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names


def _entrypoint_arguments(job: dict):
    """The RayJob's entrypoint parsed by the `infgen` command's own parser."""
    from jobs.cli import build_parser

    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.cli"], words
    arguments = build_parser().parse_args(words[3:])
    assert arguments.command == "run"
    image_path = Path(arguments.workflow)
    assert image_path.is_relative_to(PROJECT_DIRECTORY)
    assert (REPOSITORY / image_path.relative_to(PROJECT_DIRECTORY)) == REPOSITORY / "jobs" / "laion_5m.yaml"
    return arguments


def test_the_workflow_rayjob_runs_the_whole_workflow_on_its_own_cluster_of_the_same_spec(k8s):
    (job,) = k8s["rayjob-workflow.yaml"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    arguments = _entrypoint_arguments(job)
    assert arguments.first is None and arguments.last is None
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert (
        spec["ttlSecondsAfterFinished"] > 0
        and spec["activeDeadlineSeconds"] > 0
        and spec["backoffLimit"] >= 1
    )
    assert "clusterSelector" not in spec  # KubeRay refuses backoffLimit > 0 on a selected cluster
    assert spec["rayClusterSpec"] == _one(k8s, "RayCluster", "infgen")["spec"]


def test_there_is_one_single_stage_rayjob_per_workflow_stage_on_the_raycluster(k8s, workflow):
    stage_jobs = {path: documents[0] for path, documents in k8s.items() if path.startswith("stages/")}
    stages = [stage["name"] for stage in workflow["stages"]]
    assert sorted(stage_jobs) == sorted(f"stages/rayjob-{stage}.yaml" for stage in stages)
    for stage in stages:
        job = stage_jobs[f"stages/rayjob-{stage}.yaml"]
        arguments = _entrypoint_arguments(job)
        assert arguments.first == arguments.last == stage
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "infgen"}
        assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"].get("backoffLimit", 0) == 0
        assert "rayClusterSpec" not in job["spec"]


# --- MLflow ----------------------------------------------------------------------------------------------


def test_the_auth_config_is_read_by_mlflow_with_the_admin_password_left_to_the_secret(monkeypatch):
    config_module = _mlflow_server_module("auth/config.py")
    read_auth_config = config_module.read_auth_config
    get_permission = _mlflow_server_module("auth/permissions.py").get_permission

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(INFRA / "mlflow" / "basic_auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = read_auth_config()
    assert config.admin_password is None and config.admin_username == "admin"
    assert config.authorization_function == config_module.DEFAULT_AUTHORIZATION_FUNCTION
    assert get_permission(config.default_permission).can_read
    assert config.auth_cache_ttl_seconds > 0
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret-value")
    assert read_auth_config().admin_password == "from-the-secret-value"


def _auth_database_directory() -> str:
    config = configparser.ConfigParser()
    config.read(INFRA / "mlflow" / "basic_auth.ini")
    return str(Path(config["mlflow"]["database_uri"].removeprefix("sqlite:///")).parent)


def _server_options(arguments: list[str]) -> dict[str, str]:
    return dict(
        argument.removeprefix("--").split("=", 1) for argument in arguments if argument.startswith("--")
    )


def _check_server_options(options: dict[str, str], workflow) -> None:
    is_allowed_host_header = _mlflow_server_module("security_utils.py").is_allowed_host_header
    assert options["app-name"] == "basic-auth"
    assert options["backend-store-uri"].startswith("postgresql://")
    assert options["artifacts-destination"].startswith("s3://")
    assert options.get("serve-artifacts", "true") != "false" and "default-artifact-root" not in options
    service, namespace, port = _tracking(workflow)
    assert int(options["port"]) == port
    allowed = options["allowed-hosts"].split(",")
    assert is_allowed_host_header(allowed, f"{service}.{namespace}.svc:{port}")
    assert not is_allowed_host_header(allowed, f"mlflow.example.com:{port}")


def _mlflow_image_tag() -> str:
    return f"{MLFLOW_IMAGE_REPOSITORY}:{_pins()['mlflow']}"


def test_the_compose_file_runs_the_auth_server_on_postgres_and_s3_with_secrets_required(workflow):
    compose = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())
    services = compose["services"]
    server = services["mlflow"]
    assert server["image"] == _mlflow_image_tag()
    options = _server_options(server["command"])
    _check_server_options(options, workflow)
    assert options["backend-store-uri"].split("@")[1].split(":")[0] in services
    environment = server["environment"]
    for secret in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(rf"\$\{{{secret}:\?.+\}}", environment[secret]), f"{secret} must come from .env"
    assert urlparse(environment["MLFLOW_S3_ENDPOINT_URL"]).hostname in services
    port = _tracking(workflow)[2]
    assert f"{port}:{port}" in server["ports"]
    volume = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    assert volume[_auth_database_directory()] in compose["volumes"]
    example = (INFRA / "mlflow" / ".env.example").read_text()
    for variable in re.findall(r"\$\{(\w+):\?", yaml.safe_dump(compose)):
        assert f"\n{variable}=" in f"\n{example}", f"{variable} is missing from .env.example"


def test_the_k8s_mlflow_server_is_the_workflows_tracking_uri_with_its_secrets(workflow):
    directory = INFRA / "mlflow" / "k8s"
    documents = [d for path in sorted(directory.glob("*.yaml")) for d in _documents(path)]
    secrets = {
        d["metadata"]["name"]: d["stringData"] for d in _documents(INFRA / "mlflow" / "secrets.example.yaml")
    }
    service_name, namespace, port = _tracking(workflow)
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    service = by_kind_name["Service", service_name]
    assert service["metadata"]["namespace"] == namespace and service["spec"]["ports"][0]["port"] == port
    deployment = by_kind_name["Deployment", service_name]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["image"] == _mlflow_image_tag()
    options = _server_options(container["args"])
    _check_server_options(options, workflow)
    database_host = options["backend-store-uri"].split("@")[1].split(":")[0]
    assert ("Service", database_host) in by_kind_name
    environment = {variable["name"]: variable for variable in container["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "POSTGRES_PASSWORD"):
        assert "value" not in environment[name], f"{name} must come from a secret"
    for document in documents:
        for container in document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for variable in container.get("env", []):
                if "valueFrom" in variable:
                    reference = variable["valueFrom"]["secretKeyRef"]
                    assert reference["key"] in secrets[reference["name"]], reference
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert ("PersistentVolumeClaim", claim[mounts[_auth_database_directory()]]) in by_kind_name


def test_the_mlflow_image_is_built_from_the_pins_with_the_auth_extra():
    dockerfile = _dockerfile(INFRA / "mlflow" / "Dockerfile")
    (install,) = [args for instruction, args in dockerfile if instruction == "RUN" and "pip install" in args]
    assert (
        "-c /tmp/constraints.txt" in install and '"mlflow[auth]"' in install and "psycopg2-binary" in install
    )
    assert ("COPY", "infra/constraints.txt /tmp/constraints.txt") in dockerfile
    assert f"-t {_mlflow_image_tag()}" in (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"-t {_mlflow_image_tag()}" in (REPOSITORY / "docs" / "deploy.md").read_text()


# --- the guide -------------------------------------------------------------------------------------------


def test_the_deploy_guide_shows_both_paths_end_to_end():
    guide = (REPOSITORY / "docs" / "deploy.md").read_text()
    for step in (
        "--build-context models=",
        "docker push",
        "ray up infra/ray/aws-a100.yaml",
        "infgen run jobs/laion_5m.yaml --address",
        "ray down infra/ray/aws-a100.yaml",
        "kubectl apply -f infra/mlflow/k8s/",
        "kubectl apply -f infra/k8s/raycluster.yaml",
        "kubectl apply -f infra/k8s/rayjob-workflow.yaml",
        "port-forward svc/mlflow 5000",
    ):
        assert step in guide, f"docs/deploy.md does not show {step!r}"
