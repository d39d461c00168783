"""``python -m mlfactory.serving``: the model server's command line (the container's entrypoint)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mlfactory.serving.app import DEFAULT_MAX_BODY, TOKEN_ENV, ModelServer, log
from mlfactory.serving.model import ServedModel
from mlfactory.serving.prediction_log import PredictionLog



def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m mlfactory.serving", description="The mlfactory model server.")
    # Vertex AI hands a deployed model's artifact_uri (copied to its own bucket) over as AIP_STORAGE_URI; an
    # Azure ML deployment mounts its model's folder under AZUREML_MODEL_DIR
    default = env.get("MLFACTORY_MODEL_URI") or env.get("AIP_STORAGE_URI")
    if not default and env.get("AZUREML_MODEL_DIR"):
        from mlfactory.serving.model import mounted_model

        default = mounted_model(env["AZUREML_MODEL_DIR"])
    p.add_argument("--model-uri", default=default,
                   help="MLflow model to serve as variant 'primary' with all traffic (models:/name@champion, a path, "
                        "gs://..., ...; default $MLFACTORY_MODEL_URI, else Vertex AI's $AIP_STORAGE_URI, else the model "
                        "under Azure ML's $AZUREML_MODEL_DIR); without it the "
                        "server starts empty and takes variants through its admin API")
    p.add_argument("--host", default=env.get("MLFACTORY_SERVING_HOST", "0.0.0.0"),
                   help="interface to listen on (containers: 0.0.0.0; on a workstation use 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env.get("AIP_HTTP_PORT") or env.get("PORT") or 8080))
    p.add_argument("--log-uri", default=env.get("MLFACTORY_PREDICTION_LOG_URI"),
                   help="bucket prefix for the prediction log (file://, s3://, gs://, abfs://); none: no log")
    p.add_argument("--log-flush-seconds", type=float, default=10.0)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    p.add_argument("--threads", type=int, default=1, help="torch threads per forward pass")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the Azure SDKs log every HTTP request at INFO

    import torch
    import uvicorn

    torch.set_num_threads(args.threads)
    server = ModelServer(
        token=env.get(TOKEN_ENV),
        max_body_bytes=args.max_body_bytes,
        prediction_log=PredictionLog(args.log_uri, flush_seconds=args.log_flush_seconds),
        health_route=env.get("AIP_HEALTH_ROUTE", "/health"),
        predict_route=env.get("AIP_PREDICT_ROUTE", "/predict"),
    )
    if args.model_uri:
        server.add_variant("primary", ServedModel(args.model_uri, env.get("MLFACTORY_MODEL_VERSION")), 100.0)
        log.info("serving %s (version %s) on %s:%d", args.model_uri, server.variants["primary"].model.version,
                 args.host, args.port)
    uvicorn.run(server, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="on",
                loop="uvloop", http="httptools", timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
