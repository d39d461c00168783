#!/bin/sh
# The runtime image's entrypoint: `serve` (SageMaker's convention) starts the model server; anything else
# runs as given (python -m mlfactory.training.train ..., torchrun ...).
set -e
if [ "$1" = "serve" ]; then
    shift
    exec python -m mlfactory.serving "$@"
fi
exec "$@"
