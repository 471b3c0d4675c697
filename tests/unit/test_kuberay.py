"""The KubeRay manifests in cluster/kuberay/: valid against KubeRay's v1 CRD schemas (strictly:
a misspelt field fails here, where the API server would silently prune it) and in agreement
with the recipe they launch."""
from pathlib import Path

import pytest
import yaml

from r1ray.controllers.config import load_recipe

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO.parent / "shared" / "kuberay"
MANIFESTS = REPO / "cluster" / "kuberay"
RECIPE = REPO / "configs" / "qwen2.5-1.5b-h100.yaml"


def _strict(schema):
    """Reject unknown fields wherever the CRD lists the known ones."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _schema(kind_file):
    if not CRDS.exists():
        pytest.skip("../shared/kuberay (KubeRay's CRD schemas) is not here")
    crd = yaml.safe_load((CRDS / kind_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _validate(doc, schema):
    import jsonschema

    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:10])


@pytest.mark.parametrize("manifest,crd", [("raycluster.yaml", "ray.io_rayclusters.yaml"),
                                          ("rayjob.yaml", "ray.io_rayjobs.yaml"),
                                          ("raycluster-single-node.yaml", "ray.io_rayclusters.yaml"),
                                          ("rayjob-single-node.yaml", "ray.io_rayjobs.yaml"),
                                          ("rayjob-object-storage.yaml", "ray.io_rayjobs.yaml")])
def test_manifests_are_valid_kuberay_v1(manifest, crd):
    _validate(yaml.safe_load((MANIFESTS / manifest).read_text()), _schema(crd))


def test_a_misspelt_field_is_caught():
    doc = yaml.safe_load((MANIFESTS / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(AssertionError, match="maxReplica"):
        _validate(doc, _schema("ray.io_rayclusters.yaml"))


@pytest.mark.parametrize("layout", ["", "-single-node"])
def test_the_rayjob_launches_the_raycluster_spec(layout):
    """rayjob.yaml carries raycluster.yaml's spec as it is (a copy that could drift); the same
    for the single-node pair."""
    cluster = yaml.safe_load((MANIFESTS / f"raycluster{layout}.yaml").read_text())
    job = yaml.safe_load((MANIFESTS / f"rayjob{layout}.yaml").read_text())
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    plain = yaml.safe_load((MANIFESTS / "rayjob.yaml").read_text())["spec"]
    assert job["spec"]["entrypoint"] == plain["entrypoint"]


def _gpus(group):
    container = group["template"]["spec"]["containers"][0]
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def _cpus(group):
    return float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob.yaml"])
def test_manifests_agree_with_the_recipe(manifest):
    doc = yaml.safe_load((MANIFESTS / manifest).read_text())
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    if doc["kind"] == "RayJob":
        assert "configs/qwen2.5-1.5b-h100.yaml" in doc["spec"]["entrypoint"]
        assert doc["spec"]["entrypoint"].startswith("r1ray train ")
    r = load_recipe(str(RECIPE), cpus=1024, gpus=64)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    learner, rollout = groups["learner"], groups["rollout"]
    lc = r.learner
    # the `train` placement group (learner ranks + reference) fits on one learner pod
    assert _gpus(learner) == lc.num_ranks * lc.gpus_per_rank + r.reference.gpus
    assert _cpus(learner) >= lc.num_ranks * lc.cpus_per_rank + r.reference.cpus
    assert learner["minReplicas"] == learner["maxReplicas"] == learner["replicas"] == 1
    # one generator per rollout pod, with room for a scorer beside it
    assert _gpus(rollout) == r.generator.gpus_per_actor == r.generator.tensor_parallel_size
    assert _cpus(rollout) >= r.generator.cpus_per_actor + r.scorer.cpus_per_actor
    assert rollout["minReplicas"] <= r.generator.num_actors <= rollout["replicas"] <= rollout["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"].startswith("2.60")
    # /dev/shm memory-backed and the shared volume at one path, on every pod
    for pod in [spec["headGroupSpec"], learner, rollout]:
        tpl = pod["template"]["spec"]
        volumes = {v["name"]: v for v in tpl["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in tpl["containers"][0]["volumeMounts"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"] == "/dev/shm"
        assert mounts["shared"] == "/mnt/shared" and "persistentVolumeClaim" in volumes["shared"]
        assert {"name": "HF_HOME", "value": "/mnt/shared/hf-cache"} in tpl["containers"][0]["env"]


@pytest.mark.parametrize("manifest", ["raycluster-single-node.yaml", "rayjob-single-node.yaml"])
def test_the_single_node_layout_holds_the_whole_recipe_in_one_pod(manifest):
    """Learners, reference and generators in one 8-GPU pod: the weight broadcast stays on NVLink."""
    doc = yaml.safe_load((MANIFESTS / manifest).read_text())
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    r = load_recipe(str(RECIPE), cpus=1024, gpus=64)
    (node,) = spec["workerGroupSpecs"]
    lc, gen = r.learner, r.generator
    assert _gpus(node) == lc.num_ranks * lc.gpus_per_rank + r.reference.gpus + gen.num_actors * gen.gpus_per_actor == 8
    assert _cpus(node) >= (lc.num_ranks * lc.cpus_per_rank + r.reference.cpus + gen.num_actors * gen.cpus_per_actor
                           + r.scorer.num_actors * r.scorer.cpus_per_actor)
    assert node["minReplicas"] == node["maxReplicas"] == node["replicas"] == 1
    assert spec["enableInTreeAutoscaling"] is False and spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # nothing placed on the head


def test_the_object_storage_rayjob_is_rayjob_yaml_with_a_bucket_and_a_staging_folder_on_every_pod():
    plain = yaml.safe_load((MANIFESTS / "rayjob.yaml").read_text())["spec"]
    job = yaml.safe_load((MANIFESTS / "rayjob-object-storage.yaml").read_text())["spec"]
    entry = job["entrypoint"].split()
    assert entry[entry.index("--set") + 1].startswith("storage.path=s3://")
    assert entry[entry.index("--output-dir") + 1] == "runs/qwen2.5-1.5b-grpo"  # relative: under the bucket
    assert "--resume" in entry and entry[entry.index("--resume") + 1] == "auto"
    spec, base = job["rayClusterSpec"], plain["rayClusterSpec"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert len(pods) == 1 + len(base["workerGroupSpecs"])
    for pod in pods:
        tpl = pod["template"]["spec"]
        c = tpl["containers"][0]
        assert {"name": "R1RAY_STAGING", "value": "/mnt/staging"} in c["env"]
        assert {"secretRef": {"name": "r1ray-s3"}} in c["envFrom"]
        assert {"name": "staging", "mountPath": "/mnt/staging"} in c["volumeMounts"]
        assert any(v["name"] == "staging" and "emptyDir" in v for v in tpl["volumes"])
        for key in ("env", "envFrom", "volumeMounts"):  # the rest as rayjob.yaml has it
            c[key] = [x for x in c[key] if "staging" not in str(x).lower() and "r1ray-s3" not in str(x)]
            if not c[key] and key == "envFrom":
                del c[key]
        tpl["volumes"] = [v for v in tpl["volumes"] if v["name"] != "staging"]
    assert spec == base
