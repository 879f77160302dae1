"""The cluster definitions in cluster/ and examples/gpu-cluster.yaml, checked without a cloud."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ray_up_cluster_file_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster/ray-up-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does first: defaults filled in, then the schema
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert any(node["resources"].get("GPU", 0) >= 1 for node in nodes.values())
    assert config["file_mounts"] and any("pip install" in c for c in config["setup_commands"])


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.")
    assert spec["authOptions"]["mode"] == "token"  # security stays on
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert all(c["image"] for c in _containers(head["template"]))
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["replicas"] >= group.get("minReplicas", 0)
        assert "rayStartParams" in group
        limits = _containers(group["template"])[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_kuberay_raycluster_has_the_required_fields():
    manifest = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["metadata"]["name"]
    _check_cluster_spec(manifest["spec"])


def test_kuberay_rayjob_runs_modecotd_on_the_mounted_config():
    manifest = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("modecotd run /config/")
    _check_cluster_spec(spec["rayClusterSpec"])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert "/config" in mounts and {v["name"] for v in head["volumes"]} >= {"config", "runs"}


MODEL_AND_RESOURCE_KEYS = {"name", "backend", "model", "dtype", "resources", "use_gpu", "actors", "cpus_per_actor",
                           "gpus_per_actor", "workers_per_job", "cpus_per_worker", "gpus_per_worker",
                           "max_concurrent_jobs", "cpus_per_trial", "gpus_per_trial", "max_concurrent_trials",
                           "batch_size"}


def _without_models_and_resources(value):
    if isinstance(value, dict):
        return {k: _without_models_and_resources(v) for k, v in value.items() if k not in MODEL_AND_RESOURCE_KEYS}
    if isinstance(value, list):
        return [_without_models_and_resources(v) for v in value]
    return value


def test_gpu_example_differs_from_the_quickstart_only_in_models_and_resources():
    from modecotd.config_loading import load_config

    quickstart = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    gpu = yaml.safe_load((ROOT / "examples/gpu-cluster.yaml").read_text())
    assert _without_models_and_resources(gpu) == _without_models_and_resources(quickstart)
    config = load_config(ROOT / "examples/gpu-cluster.yaml")
    assert config.teacher.gpus_per_actor >= 1 and config.distill.use_gpu and config.mixture.gpus_per_trial > 0


def _pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_every_kuberay_pod_mounts_the_same_runs_volume_and_workers_get_shared_memory():
    """Nodes that share no disk reach one storage: the ReadWriteMany claim at /runs on every pod
    (or an object store, whose keys every pod may read from one Secret)."""
    claim = yaml.safe_load((ROOT / "cluster/kuberay/storage.yaml").read_text())
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("raycluster.yaml", "rayjob.yaml"):
        manifest = yaml.safe_load((ROOT / "cluster/kuberay" / name).read_text())
        spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        for pod in _pod_specs(spec):
            volumes = {v["name"]: v for v in pod["volumes"]}
            container = pod["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/runs"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name
            assert {"secretRef": {"name": "modecotd-s3", "optional": True}} in container["envFrom"], name
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    rayjob = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    assert "--storage /runs" in rayjob["spec"]["entrypoint"]


def test_the_image_leaves_local_environments_and_runs_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", ".git"} <= ignored


def test_ray_up_keeps_the_token_pins_ray_and_copies_no_local_state():
    config = yaml.safe_load((ROOT / "cluster/ray-up-gpu.yaml").read_text())
    assert "~/.ray/auth_token" in config["file_mounts"]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if c.strip().endswith("6379") or "--head" in c)
    assert {".venv", "runs", ".git"} <= set(config["rsync_exclude"])
    assert any("ray[default,train,tune]==" in c for c in config["setup_commands"])
    for node in config["available_node_types"].values():  # every node reaches the S3 storage through its role
        assert "IamInstanceProfile" in node["node_config"]


def test_the_grafana_dashboard_shows_only_metrics_the_code_exports():
    """Every metric a panel queries is one the code defines (Ray exports it with the prefix ray_), and
    every one the code defines has a panel."""
    import json
    import re

    root = Path(__file__).resolve().parent.parent
    dashboard = json.loads((root / "cluster/grafana/modecotd-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"ray_(modecotd_[a-z_]+?)(?:\(_total\)\?)?[{\"]", target["expr"])}
    code = "\n".join(p.read_text() for folder in ("jobs", "modecotd", "tuning") for p in (root / folder).rglob("*.py"))
    defined = set(re.findall(r'(?:Gauge|Counter|Histogram)\(\s*"(modecotd_[a-z_]+)"', code))
    defined |= {f"modecotd_distill_{key}" for key in re.findall(r'\("([a-z_]+)", "[^"]+"\)', code.split(
        'Gauge(f"modecotd_distill_{key}"')[1].split("}")[0])}
    assert queried and queried == defined, (queried, defined)
