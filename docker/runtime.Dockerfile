# The training / serving image: what SageMaker, Vertex AI and Azure ML run (`image_uri` of every cloud
# section), and the compose and Helm model server. No Airflow process runs in it.
#   docker build -f docker/runtime.Dockerfile -t mlfactory:1.0 .                         # CPU
#   docker build -f docker/runtime.Dockerfile -t mlfactory:1.0-cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#     --build-arg XGBOOST=xgboost==3.2.0 .                                              # CUDA (bundles its CUDA libraries;
#                                                                                       #   the host needs the NVIDIA driver)
# Entrypoints, the same everywhere:
#   python -m mlfactory.training.train ...  training (SageMaker ContainerEntrypoint, Vertex command, Azure ML command,
#                                           torchrun)
#   serve                                   the model server (SageMaker runs the image with `serve`);
#                                           = python -m mlfactory.serving
#   python -m mlfactory.serving ...         the model server with options
FROM python:3.11-slim-bookworm
#checkov:skip=CKV_DOCKER_2:training jobs run this image too; the platforms probe the server's routes (/ping, /live, /ready)

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN useradd --create-home --uid 1000 mlfactory
COPY requirements.txt /opt/mlfactory/requirements.txt
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -r /opt/mlfactory/requirements.txt \
 && pip check
# gbdt on GPUs: XGBoost's CUDA wheel (`xgboost`, with NCCL) in place of the lock's CPU-only `xgboost-cpu`, the same module
ARG XGBOOST=""
RUN if [ -n "${XGBOOST}" ]; then pip uninstall --yes xgboost-cpu && pip install --no-cache-dir "${XGBOOST}"; fi
COPY include /opt/mlfactory/include
COPY docker/entrypoint.sh /usr/local/bin/mlfactory-entrypoint
ENV PYTHONPATH=/opt/mlfactory/include \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
USER mlfactory
WORKDIR /home/mlfactory
EXPOSE 8080
ENTRYPOINT ["mlfactory-entrypoint"]
CMD ["serve"]
