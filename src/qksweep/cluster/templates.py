"""Cluster templates: Ray cluster launcher YAMLs (AWS, GCP) and a KubeRay ``RayJob`` manifest.

The templates live in ``cluster/templates/*.yaml`` (package data) with ``{{name}}`` placeholders;
:func:`render` fills them in. The launcher configs validate against the cluster schema shipped in the
``ray`` package (``ray/autoscaler/ray-schema.json``), see :func:`validate_launcher_config`.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import ConfigError

KINDS = ("aws", "gcp", "kuberay")
# GPUs per node → (instance type, vCPUs)
AWS_GPU_NODES = {1: ("g5.2xlarge", 8), 4: ("g5.12xlarge", 48), 8: ("p4d.24xlarge", 96)}
GCP_GPU_NODES = {1: ("a2-highgpu-1g", 12), 2: ("a2-highgpu-2g", 24), 4: ("a2-highgpu-4g", 48),
                 8: ("a2-highgpu-8g", 96), 16: ("a2-megagpu-16g", 96)}
DEFAULT_IMAGE = "YOUR-REGISTRY/qksweep:latest"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def template_text(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"unknown template '{kind}': choose one of {', '.join(KINDS)}")
    return resources.files("qksweep.cluster").joinpath("templates", f"{kind}.yaml").read_text(encoding="utf-8")


def _node_type(kind: str, gpus: int) -> tuple[str, int]:
    table = AWS_GPU_NODES if kind == "aws" else GCP_GPU_NODES
    if gpus not in table:
        raise ConfigError(f"--gpus-per-node {gpus}: the {kind} template knows nodes with "
                          f"{', '.join(str(g) for g in table)} GPUs ({', '.join(t for t, _ in table.values())}); "
                          "pick one, or edit InstanceType/machineType in the written file")
    return table[gpus]


def template_values(kind: str, *, gpus_per_node: int = 8, max_workers: int = 8, name: str = "qksweep",
                    image: str | None = None, num_samples: int | None = None) -> dict[str, Any]:
    import ray

    from .connect import RAY_ENV
    from .jobs import JOB_ENV

    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1 (got {gpus_per_node})")
    if max_workers < 1:
        raise ConfigError(f"--max-workers must be at least 1 (got {max_workers})")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", name):
        raise ConfigError(f"--name '{name}': use lowercase letters, digits and '-' (a Kubernetes/cloud resource name)")
    values: dict[str, Any] = {
        "cluster_name": name, "job_name": name, "sweep_name": f"{name}-sweep",
        "gpus_per_node": gpus_per_node, "max_workers": max_workers, "total_gpus": gpus_per_node * max_workers,
        "num_samples": num_samples or gpus_per_node * max_workers, "ray_version": ray.__version__,
        "image": image or DEFAULT_IMAGE, "worker_cpus": 8 * gpus_per_node, "worker_memory": f"{60 * gpus_per_node}Gi",
        "env_vars": "\n".join(f'      {k}: "{v}"' for k, v in {**RAY_ENV, **JOB_ENV}.items()),
    }
    if kind in ("aws", "gcp"):
        values["worker_instance"], values["worker_cpus"] = _node_type(kind, gpus_per_node)
    return values


def render(kind: str, **kw: Any) -> str:
    """The template for ``kind`` (aws, gcp, kuberay) with its placeholders filled in."""
    text = template_text(kind)
    values = template_values(kind, **kw)
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if missing:  # a template bug, not user input
        raise RuntimeError(f"template {kind}.yaml has unknown placeholders: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def write(kind: str, out: str | Path | None, *, force: bool = False, **kw: Any) -> str:
    """Render and write to ``out`` (refusing to overwrite unless ``force``); returns the text."""
    text = render(kind, **kw)
    if out is not None:
        p = Path(out)
        if p.exists() and not force:
            raise ConfigError(f"{out} exists: pick another --out or pass --force")
        if not p.parent.exists():
            raise ConfigError(f"--out {out}: folder {p.parent} does not exist")
        p.write_text(text, encoding="utf-8")
    return text


def ray_cluster_schema() -> dict[str, Any]:
    import json

    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def validate_launcher_config(config: dict[str, Any]) -> None:
    """Validate a launcher config against Ray's own cluster schema (raises jsonschema.ValidationError)."""
    import jsonschema

    jsonschema.validate(config, ray_cluster_schema())
