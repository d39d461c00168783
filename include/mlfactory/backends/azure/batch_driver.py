"""The scoring script of the `azure` backend's batch deployments (Azure ML's ``init()`` / ``run(mini_batch)``
contract), on the project's image.

ml_batch_score writes one manifest (JSON) per curated snapshot to score and invokes the batch endpoint over
their folder; Azure ML hands each instance one manifest at a time (``mini_batch_size`` 1). For each, the
snapshot is read from the bucket in chunks, scored with the model Azure ML mounted at ``AZUREML_MODEL_DIR``
and written as Parquet parts under the run's output folder, ``source=<snapshot>/`` (the same columns as
every backend's batch scoring). A retried mini-batch writes its folder again: it replaces, never duplicates.

The deployment's code asset is a one-line ``batch_driver.py`` that imports this module (the package is in
the image): ``init`` and ``run`` live here, versioned with the rest of the project.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)
_model = None


def manifest(inputs: dict[str, str], needed: list[str], keys: list[str], chunk_rows: int, version: str,
             output_uri: str) -> bytes:
    """One mini-batch's work: ``inputs`` (label -> snapshot URI) into ``output_uri``."""
    return json.dumps({"inputs": inputs, "needed": needed, "keys": keys, "chunk_rows": chunk_rows,
                       "version": version, "output_uri": output_uri}, sort_keys=True).encode()


def init() -> None:
    global _model
    from mlfactory.serving.scoring import load_tabular_model
    from mlfactory.serving.model import mounted_model

    _model = load_tabular_model(mounted_model(os.environ["AZUREML_MODEL_DIR"]))
    log.info("batch driver: model from %s", os.environ["AZUREML_MODEL_DIR"])


def run(mini_batch: list[str]) -> list[str]:
    """Score each manifest of ``mini_batch`` (local paths Azure ML mounted); one summary line per manifest."""
    from mlfactory.serving.scoring import write_predictions
    from mlfactory.serving.batch import read_batches

    done = []
    for path in mini_batch:
        with open(path, "rb") as f:
            work = json.load(f)
        written = write_predictions(_model, read_batches(work["inputs"], work["needed"], work["chunk_rows"]),
                                    work["keys"], work["version"], work["output_uri"])
        done.append(f"{os.path.basename(path)}: {written['rows']} rows in {written['files']} file(s) -> {work['output_uri']}")
        log.info(done[-1])
    return done
