"""Azure ML's container conventions, for the training entrypoint and the model server.

| meaning | Azure ML (PyTorch distribution) |
|---|---|
| nodes | ``WORLD_SIZE`` ÷ ``AZUREML_PROCESS_COUNT_PER_INSTANCE`` (per-node launch: 1) |
| this node's rank | ``NODE_RANK`` |
| master address | ``MASTER_ADDR`` (+ ``MASTER_PORT``) |
| processes per node | GPUs seen by torch (else 1) |
| training data, model output, checkpoints | the command's ``--train-uri ${{inputs.train}}``, ``--output-uri ${{outputs.model}}``, ``--checkpoint-uri`` |
| job id (an MLflow tag) | ``AZUREML_RUN_ID`` |
| serving | the registered model's folder mounted under ``AZUREML_MODEL_DIR``; ``PORT`` |

Azure ML's own per-process launch (``process_count_per_instance`` = GPUs) sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every process, exactly as torchrun does, so the
entrypoint then runs directly without launching anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mlfactory.training.cluster import Cluster, visible_gpus
from mlfactory.runtime import DataLocations, ServingDefaults, master_port


def cluster(env: Mapping[str, str], nproc_per_node: int | None = None) -> Cluster:
    per_node = int(env.get("AZUREML_PROCESS_COUNT_PER_INSTANCE", "1") or 1)
    return Cluster("azureml", max(1, int(env.get("WORLD_SIZE", "1")) // per_node), int(env.get("NODE_RANK", "0")),
                   env.get("MASTER_ADDR", "127.0.0.1"), master_port(env), nproc_per_node or visible_gpus() or 1,
                   env.get("AZUREML_RUN_ID", ""))


def data_locations(env: Mapping[str, str]) -> DataLocations:
    return DataLocations()  # the command line names them (${{inputs.train}}, ${{outputs.model}})


def serving_defaults(env: Mapping[str, str] = os.environ) -> ServingDefaults:
    model_uri = None
    if env.get("AZUREML_MODEL_DIR"):
        from mlfactory.serving.model import mounted_model

        model_uri = mounted_model(env["AZUREML_MODEL_DIR"])
    return ServingDefaults(authenticates_callers=True, model_uri=model_uri, port=int(env["PORT"]) if env.get("PORT") else None)
