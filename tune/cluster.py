"""Ray for the study: connect (or start a local Ray), count trial slots, put the data and the
backbone into the object store once, and run crackcore.fit as Ray tasks on the nodes that
hold the resources (repeats, the final retrain)."""
from __future__ import annotations

import dataclasses
import socket
import sys
from typing import Any

import numpy as np
import ray
import ray._private.ray_constants as ray_constants  # Ray offers no public switch for a loopback-only node
from ray.experimental import tqdm_ray

from crackcore.config import StudyConfig, TrainConfig
from crackcore.exceptions import StudyError
from crackcore.faults import kill_point
from crackcore.progress import bars
from crackcore.devices import available_cpus
from crackcore.train import fit
from tune.trainable import within_resources


def connect_ray(address: str | None) -> dict[str, Any]:
    if address and address.startswith("ray://"):
        # under Ray Client the Tuner runs on the head while our journal and outputs are local paths
        raise StudyError(f"--address {address}: Ray Client (ray://) is not supported; submit the study with "
                         "`ray job submit --address http://HEAD:8265 -- python tune/run.py ...`, or run it on the "
                         "head node with --address auto")
    if address and "://" not in address and address != "auto":
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise StudyError(f"--address {address} is not HOST:PORT; give e.g. 10.0.0.5:6379, or auto for a cluster "
                             "started on this machine")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise StudyError(f"cannot reach a Ray cluster at {address} ({exc}); start one with `ray start --head "
                             f"--port={port or 6379}` or drop --address to run locally") from None
    try:
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        else:
            # Ray resolves _node_ip_address="127.0.0.1" to the machine's reachable address, and its
            # servers (GCS, raylet, object manager, workers) then listen on every interface. Out of
            # cluster mode its node address stays the loopback one and they listen on 127.0.0.1
            # alone: a local study needs no other host (a cluster is joined with --address).
            ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(num_cpus=available_cpus(), include_dashboard=False, logging_level="WARNING",
                     _node_ip_address="127.0.0.1")
    except ConnectionError as exc:
        raise StudyError(f"cannot connect to Ray at {address}: {str(exc).splitlines()[0]}; check the address "
                         "(ray status) or drop --address") from None
    except ValueError as exc:  # ray.init() found a cluster started with `ray start` on this machine
        if "existing cluster" not in str(exc):
            raise
        raise StudyError("a Ray cluster is already running on this machine; pass --address auto to run the study "
                         "on it, or stop it with `ray stop`") from None
    return ray.cluster_resources()


def trial_slots(cfg: StudyConfig, resources: dict[str, float]) -> int:
    """Trials running at once: what the cluster holds now, or --max-concurrent-trials when given.
    The cap also bounds how many points TPE proposes before seeing results; on an autoscaling
    cluster give it explicitly, so pending trials make Ray add nodes."""
    slots = int(resources.get("CPU", 0) // cfg.cpus_per_trial)
    if cfg.gpus_per_trial > 0:
        slots = min(slots, int(resources.get("GPU", 0) // cfg.gpus_per_trial))
    if cfg.max_concurrent_trials:
        return min(cfg.max_concurrent_trials, cfg.num_samples)
    if slots < 1:
        raise StudyError(f"one trial needs {cfg.cpus_per_trial:g} CPU / {cfg.gpus_per_trial:g} GPU but the cluster has "
                         f"{resources.get('CPU', 0):g} CPU / {resources.get('GPU', 0):g} GPU; lower --cpus-per-trial")
    return min(slots, cfg.num_samples)


def put_data(data: Any) -> Any:
    """The prepared data in Ray's object store, once for the whole cluster. A plain ndarray (not
    a memmap subclass) is stored out-of-band: zero-copy reads per node."""
    return ray.put(dataclasses.replace(data, images=np.asarray(data.images).view(np.ndarray)))


def node_resources() -> dict[str, dict[str, float]]:
    """CPUs and GPUs of each live node, by node id (trials.parquet's node_id)."""
    return {n["NodeID"]: {k: n["Resources"].get(k, 0.0) for k in ("CPU", "GPU")} for n in ray.nodes() if n["Alive"]}


def final_resources(cfg: StudyConfig) -> tuple[int, float]:
    """(CPUs, GPUs) of the final retrain: one whole GPU when trials used GPUs, and as many CPUs
    (up to 8) as the biggest node that can hold it has, so the task is always schedulable."""
    gpus = 1.0 if cfg.gpus_per_trial > 0 else 0.0
    biggest_node = max((r["CPU"] for r in node_resources().values() if r["GPU"] >= gpus), default=1)
    return max(1, int(min(biggest_node, 8))), gpus


def fit_remote(data_ref: Any, cfgs: list[TrainConfig], backbone_ref: Any, num_cpus: float, num_gpus: float,
               evaluate_test: bool, label: str, diverged_ok: bool = False) -> list[Any]:
    """Run crackcore.fit for each config as a Ray task, in parallel as resources allow (the
    driver may have no GPU). Returns FitResults; models only when the test split is evaluated.
    A run whose loss turned non-finite is None with `diverged_ok`, else a one-line StudyError."""
    # A task's output reaches the terminal through the driver: Ray's own tqdm draws the bars there
    # (plain lines when the driver logs to a file).
    bar = tqdm_ray.tqdm if sys.stderr.isatty() else None

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
    def _fit(refs: list, cfg: TrainConfig) -> Any:
        data, weights = ray.get(refs)
        with bars(bar):
            result = fit(within_resources(cfg, num_cpus, num_gpus), data, evaluate_test=evaluate_test, weights=weights,
                         on_epoch=lambda row, _: kill_point(f"{label}:epoch{row['epoch']}"),
                         log=lambda s: print(f"[{label} seed {cfg.seed}] {s}", flush=True),
                         progress=evaluate_test)  # the retrains that run one at a time, not the parallel repeats
        result.model = result.model.cpu() if evaluate_test else None
        result.extra["node_id"] = ray.get_runtime_context().get_node_id()
        return result

    results = []
    for cfg, ref in [(cfg, _fit.remote([data_ref, backbone_ref], cfg)) for cfg in cfgs]:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            if not isinstance(exc.cause, FloatingPointError):
                raise
            if not diverged_ok:  # one line, not a remote traceback
                raise StudyError(f"{label} diverged (non-finite training loss) at lr {cfg.lr:.3g}; best_config.json "
                                 "and trials.parquet are written: retrain a runner-up or a lower lr with python -m "
                                 "crackcore.fit") from None
            results.append(None)
    return results
