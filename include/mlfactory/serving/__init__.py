"""The model server: one HTTP server, one container image, every platform this project deploys to.

    python -m mlfactory.serving --model-uri models:/customer_churn@champion --port 8080

It loads a model from the MLflow registry (or any MLflow model URI) and answers on one port:

| platform | health | predict |
|---|---|---|
| MLflow scoring protocol | `GET /ping`, `GET /health` | `POST /invocations`: `dataframe_split`, `dataframe_records`, `instances`, `inputs` (JSON) or CSV |
| SageMaker container contract | `GET /ping` | `POST /invocations` (port 8080); batch transform sends each Parquet file whole (`application/vnd.apache.parquet`) |
| Vertex AI custom container | the health route Vertex names | the predict route and port Vertex names: `{"instances": [...]}` → `{"predictions": [...]}` |
| Azure ML online endpoint | liveness `GET /`, readiness `GET /ready` | `POST /score` (`input_data` as split or records, or any of the above) |

In a container, ``MLFACTORY_MODEL_URI`` names the model (a SageMaker Model points it at the
version's files in S3), else the platform hands it over (Vertex AI's copy of the Model's artifact_uri,
Azure ML's mounted model: each backend's ``runtime`` module, ``mlfactory.runtime``, reads its platform's
routes, port, model and payload limits), and ``MLFACTORY_MODEL_VERSION`` the registered version it is.

Every predict route takes every body format and answers ``{"predictions": [{...}, ...]}``, one
object per row, as the MLflow pyfunc's output columns.

- **Input is checked against the model signature**: a missing or unknown column, a value of the wrong
  type, a null in a required column, an empty batch or malformed JSON/CSV get a 4xx whose message
  names the problem. A model that raises gets a 500 that says so.
- **Limits** (``limits``): body size per content type, inflated and Parquet-decoded size and rows,
  header bytes, request ids, requests in flight (503 + Retry-After), body and model time.
- **Auth** (``auth``): predict-only client tokens (``MLFACTORY_SERVING_TOKEN``, the tokens file) on the
  public port; the admin token (``MLFACTORY_SERVING_ADMIN_TOKEN``) on the admin port only, which loads
  only ``models:/<--allowed-model>/<version>``. Health routes need no token and name no version.
- **Metrics** in Prometheus format on ``GET /metrics``: requests by route and status, latency
  histogram, predicted rows, model errors, and the version each variant serves.
- **Prediction log**: inputs, outputs, model version, variant and time, appended in batches as
  Parquet under ``--log-uri`` by a background thread (never on the request path), for ml_monitor.
- **Variants** (blue/green and canary on one endpoint, as SageMaker production variants, Vertex AI
  traffic splits and Azure ML deployments do): ``PUT /admin/variants/{name}`` loads a model version,
  ``PUT /admin/traffic`` sets the weights, ``DELETE /admin/variants/{name}`` unloads one; the
  ``X-Target-Variant`` header sends a request to one variant whatever its weight (smoke tests).
- **Speed**: concurrent requests to a variant are micro-batched into one forward pass on a worker
  thread while the event loop keeps parsing; the model is loaded once, never per request.

Modules: ``payloads`` (request bodies of every contract, checked against the signature), ``auth``,
``limits``, ``model``
(a model version loaded once), ``prediction_log``, ``metrics``, ``app`` (the ASGI server: routes,
auth, variants, micro-batching) and ``__main__`` (the command line).

The serving stage around it (ml_deploy, ml_batch_score): ``deployment`` (the version to deploy, its
``EndpointSpec``, the endpoint's state, rollback of the alias), ``rollout`` (the five rollout steps and their
verdict over a backend's ``EndpointAdapter``), ``batch`` (a run's ``BatchJobSpec``: what is scored) and
``scoring`` (the prediction writer our own scoring code shares). None of them is imported by the server.
"""
