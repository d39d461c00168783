# The Airflow image of docker-compose.yaml and of the Helm values (deploy/helm): the official Airflow 3.3.2
# image on Python 3.11 with the project's lock, DAGs, plugins and library baked in.
#   docker build -t mlfactory-airflow .                                    # CPU torch (the default)
#   docker build -t mlfactory-airflow:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#     --build-arg XGBOOST=xgboost==3.2.0 .
# The CUDA build is the one for workers that train on GPUs (the compose `gpu` worker, the Helm GPU pods).
FROM apache/airflow:3.3.2-python3.11
#checkov:skip=CKV_DOCKER_2:one image, many processes: each compose service and Helm pod declares its own health check

# torch==2.13.0 in the lock: this index decides its build (+cpu, +cu128); every other pin comes from PyPI
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY --chown=airflow:root requirements.txt /opt/mlfactory/requirements.txt
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -r /opt/mlfactory/requirements.txt \
 && pip check
# gbdt on GPUs: XGBoost's CUDA wheel (`xgboost`, with NCCL) in place of the lock's CPU-only `xgboost-cpu`, the same module
ARG XGBOOST=""
RUN if [ -n "${XGBOOST}" ]; then pip uninstall --yes xgboost-cpu && pip install --no-cache-dir "${XGBOOST}"; fi

COPY --chown=airflow:root include /opt/mlfactory/include
COPY --chown=airflow:root plugins /opt/airflow/plugins
COPY --chown=airflow:root dags /opt/airflow/dags
# the KubernetesExecutor's pod of the training tasks (deploy/helm/values.yaml: MLFACTORY_TRAINING_POD_TEMPLATE)
COPY --chown=airflow:root deploy/helm/gpu-training-pod.yaml /opt/airflow/pod_templates/gpu-training-pod.yaml
# the library and the Airflow layer importable by every process: components, tasks, torchrun workers
ENV PYTHONPATH=/opt/mlfactory/include:/opt/airflow/plugins \
    MLFACTORY_CONFIG=/opt/mlfactory/include/pipeline.yaml \
    GX_ANALYTICS_ENABLED=False \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
USER airflow
