"""``python -m mlfactory.serving``: the model server's command line (the container's entrypoint)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mlfactory import runtime
from mlfactory.serving.app import ModelServer, log
from mlfactory.serving.auth import Credentials
from mlfactory.serving.limits import BoundedHttpToolsProtocol, Limits
from mlfactory.serving.model import ServedModel
from mlfactory.serving.prediction_log import PredictionLog


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    # the platform's own answers (the model it mounted or copied, its port, routes and payload limits):
    # mlfactory.runtime, from the backend the container runs under
    platform = runtime.of(env).serving_defaults(env)
    p = argparse.ArgumentParser(prog="python -m mlfactory.serving", description="The mlfactory model server.")
    p.add_argument("--model-uri", default=env.get("MLFACTORY_MODEL_URI") or platform.model_uri,
                   help="MLflow model to serve as variant 'primary' with all traffic (models:/name@champion, a path, "
                        "gs://..., ...; default $MLFACTORY_MODEL_URI, else the model the platform hands over); without "
                        "it the server starts empty and takes variants through its admin API")
    p.add_argument("--host", default=env.get("MLFACTORY_SERVING_HOST", "0.0.0.0"),
                   help="interface to listen on (containers: 0.0.0.0; on a workstation use 127.0.0.1)")
    p.add_argument("--port", type=int, default=platform.port or 8080)
    p.add_argument("--log-uri", default=env.get("MLFACTORY_PREDICTION_LOG_URI"),
                   help="bucket prefix for the prediction log (file://, s3://, gs://, abfs://); none: no log")
    p.add_argument("--log-flush-seconds", type=float, default=10.0)
    p.add_argument("--admin-host", default=env.get("MLFACTORY_SERVING_ADMIN_HOST", "127.0.0.1"),
                   help="interface of the admin API (ml_deploy's traffic and variants): keep it where only the "
                        "deployment step reaches it (loopback, or a network without a published port)")
    p.add_argument("--admin-port", type=int, default=int(env.get("MLFACTORY_SERVING_ADMIN_PORT") or 0) or None,
                   help="port of the admin API (needs $MLFACTORY_SERVING_ADMIN_TOKEN); none: no admin API")
    p.add_argument("--allowed-model", default=env.get("MLFACTORY_SERVING_ALLOWED_MODEL"),
                   help="the registered model whose versions the admin API may load (models:/<it>/<version> only)")
    defaults = Limits()
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                   help="JSON, JSON lines and CSV bodies (default 10 MiB)")
    p.add_argument("--max-batch-body-bytes", type=int, default=defaults.max_batch_body_bytes,
                   help="Parquet bodies, and every body in a platform's batch job (default 100 MiB, or the "
                        "platform's payload limit)")
    p.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent,
                   help="predict requests in flight; past it a 503 with Retry-After")
    p.add_argument("--predict-timeout", type=float, default=defaults.predict_timeout_s,
                   help="seconds the model has to answer (a hung model: 504)")
    p.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                   help="seconds a client has to send its whole body (a slow one: 408)")
    p.add_argument("--head-timeout", type=float, default=defaults.head_timeout_s,
                   help="seconds a client has to send a request's line and headers (then a 408 and close)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per forward pass")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the Azure SDKs log every HTTP request at INFO

    import torch
    import uvicorn

    try:
        credentials = Credentials.from_env(env)
        if args.admin_port and not (credentials.admin_digest and args.allowed_model):
            raise ValueError("--admin-port needs $MLFACTORY_SERVING_ADMIN_TOKEN and --allowed-model "
                             "($MLFACTORY_SERVING_ALLOWED_MODEL)")
        if args.admin_port == args.port:
            raise ValueError(f"--admin-port must differ from --port ({args.port})")
        if not (credentials.clients_required or platform.authenticates_callers or is_loopback(args.host)):
            raise ValueError(f"--host {args.host} takes requests from other machines: set client tokens "
                             f"($MLFACTORY_SERVING_TOKEN or $MLFACTORY_SERVING_TOKENS_FILE), or listen on 127.0.0.1")
    except (OSError, ValueError) as err:
        p.error(str(err))
    limits = Limits.for_platform(platform, max_body_bytes=args.max_body_bytes, max_batch_body_bytes=args.max_batch_body_bytes,
                             max_concurrent=args.max_concurrent, predict_timeout_s=args.predict_timeout,
                             body_timeout_s=args.body_timeout, head_timeout_s=args.head_timeout)
    torch.set_num_threads(args.threads)
    server = ModelServer(
        credentials=credentials,
        limits=limits,
        prediction_log=PredictionLog(args.log_uri, flush_seconds=args.log_flush_seconds),
        health_route=platform.health_route,
        predict_route=platform.predict_route,
        admin_port=args.admin_port,
        allowed_model=args.allowed_model,
    )
    if args.model_uri:
        server.add_variant("primary", ServedModel(args.model_uri, env.get("MLFACTORY_MODEL_VERSION")), 100.0)
        log.info("serving %s (version %s) on %s:%d", args.model_uri, server.variants["primary"].model.version,
                 args.host, args.port)
    listen = [(args.host, args.port)] + ([(args.admin_host, args.admin_port)] if args.admin_port else [])
    # (no uvicorn limit_concurrency: the protocol caps connections, the server the requests in flight and their bytes)
    config = uvicorn.Config(server, log_level="warning", access_log=False, lifespan="on", loop="uvloop",
                            http=BoundedHttpToolsProtocol.bounded_by(limits), timeout_graceful_shutdown=10,
                            timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[bind(host, port) for host, port in listen])
    return 0


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int):
    """A listening socket on host:port (IPv4 or IPv6), as uvicorn binds its own."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
