"""The cluster launch files in experiments/ parse, carry what Ray / KubeRay require, and run
the study with a command line our own CLI accepts."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tune.settings import build_parser

REPO = Path(__file__).resolve().parents[1]


def _study_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "tune/run.py"], argv
    return argv[2:]


def _check_cli(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)  # exits (SystemExit) on any unknown flag
    assert (REPO / args.config).is_file(), args.config
    assert args.num_samples == 32
    assert args.storage_path.startswith(("s3://", "gs://")), "multi-node studies need shared storage"


def test_ray_cluster_launcher_config_is_valid() -> None:
    text = (REPO / "experiments" / "cluster-aws.yaml").read_text()
    config = yaml.safe_load(text)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the schema `ray up` itself validates against
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}")
    assert any("pip install" in c and "crack" in c for c in config["setup_commands"])
    command = re.search(r"STUDY_COMMAND: (.+)", text).group(1)
    _check_cli(_study_argv(command))


def test_kuberay_rayjob_manifest() -> None:
    job = yaml.safe_load((REPO / "experiments" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(m["mountPath"] == "/data" for m in head["volumeMounts"])
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(workers["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    argv = _study_argv(spec["entrypoint"])
    _check_cli(argv)
    assert build_parser().parse_args(argv).data[0].startswith("/data/")


@pytest.mark.parametrize("name", ["study.toml", "baseline.toml"])
def test_experiment_files_load(name: str) -> None:
    from crackcore.config import apply_overrides, load_study_config

    cfg = load_study_config(REPO / "experiments" / name)
    for profile in (cfg.cpu, cfg.gpu):
        apply_overrides(cfg, profile)
