"""The model server over real HTTP, serving a model from a real MLflow registry: every platform's
request format gives the pyfunc's own predictions, every bad request its 4xx, auth, metrics, and the
prediction log in the bucket."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pandas as pd
import pytest

from mlfactory import storage
from mlfactory.processes import free_port, stop_group

TOKEN = "test-token-0123456789"
VERTEX_PREDICT = "/v1/endpoints/123/deployedModels/456:predict"
VERTEX_HEALTH = "/v1/endpoints/123/deployedModels/456"


def call(url: str, path: str, body=None, token: str | None = TOKEN, content_type="application/json",
         method: str | None = None, headers: dict | None = None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw, status, reply_headers = response.read(), response.status, response.headers
    except urllib.error.HTTPError as err:
        raw, status, reply_headers = err.read(), err.code, err.headers
    try:
        return status, json.loads(raw), reply_headers
    except json.JSONDecodeError:
        return status, raw.decode(), reply_headers


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    from mlfactory.registry import CHAMPION, Registry

    cfg, wire, _ = champion
    # the `champion` fixture's first version, whatever other modules did with the alias since
    Registry(cfg).client.set_registered_model_alias(cfg.model_name, CHAMPION, "1")
    port = free_port()
    log_uri = storage.join(cfg.storage.bucket, "predictions", "serving")
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri, "MLFACTORY_SERVING_TOKEN": TOKEN,
           "AIP_PREDICT_ROUTE": VERTEX_PREDICT, "AIP_HEALTH_ROUTE": VERTEX_HEALTH, "AIP_HTTP_PORT": str(port)}
    logfile = open(tmp_path_factory.mktemp("server") / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlfactory.serving", "--model-uri", f"models:/{cfg.model_name}@champion",
         "--host", "127.0.0.1", "--log-uri", log_uri, "--log-flush-seconds", "0.5"],
        env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"  # the port came from AIP_HTTP_PORT, as on Vertex AI
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(logfile.name).read()[-3000:]
        try:
            if call(url, "/ping", token=None)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.3)
    else:
        pytest.fail("the model server did not come up: " + open(logfile.name).read()[-3000:])
    yield url, log_uri
    stop_group(proc)
    logfile.close()


@pytest.fixture(scope="module")
def expected(champion):
    """The MLflow pyfunc's own predictions, loaded in-process."""
    import mlflow.pyfunc

    cfg, wire, _ = champion
    rows = wire.head(25).reset_index(drop=True)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@champion")
    return rows, model.predict(rows)


def records(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")]


def assert_same(predictions: list[dict], want: pd.DataFrame) -> None:
    assert len(predictions) == len(want)
    got = pd.DataFrame(predictions)
    assert list(got.columns) == list(want.columns)
    assert got["prediction"].tolist() == want["prediction"].tolist()
    assert got["probability"].to_numpy() == pytest.approx(want["probability"].to_numpy(), abs=1e-6)


def curated_parquet(typed: pd.DataFrame) -> bytes:
    """Rows as a curated Parquet file holds them: typed timestamps, the key and target columns too."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(typed.reset_index(drop=True), preserve_index=False), buffer)
    return buffer.getvalue()


def test_every_platform_format_gives_the_pyfuncs_predictions(server, expected, champion):
    url, _ = server
    rows, want = expected
    typed = champion[2].head(len(rows))
    assert set(typed.columns) - set(rows.columns) and (typed["age"].to_numpy() == rows["age"].to_numpy()).all()
    recs = records(rows)
    split = {"columns": list(rows.columns), "data": [[r[c] for c in rows.columns] for r in recs]}
    csv_body = rows.to_csv(index=False).encode()
    requests = {
        "mlflow dataframe_split": ("/invocations", {"dataframe_split": split}, "application/json"),
        "mlflow dataframe_records": ("/invocations", {"dataframe_records": recs}, "application/json"),
        "mlflow instances": ("/invocations", {"instances": recs}, "application/json"),
        "mlflow inputs (columnar)": ("/invocations", {"inputs": {c: [r[c] for r in recs] for c in rows.columns}},
                                     "application/json"),
        "mlflow csv / sagemaker text/csv": ("/invocations", csv_body, "text/csv"),
        "vertex ai instances as lists": (VERTEX_PREDICT, {"instances": split["data"], "parameters": {}}, "application/json"),
        "vertex ai instances as objects": (VERTEX_PREDICT, {"instances": recs}, "application/json"),
        "azure ml input_data": ("/score", {"input_data": {**split, "index": list(range(len(recs)))}}, "application/json"),
        "sagemaker batch transform: a curated parquet file": ("/invocations", curated_parquet(typed),
                                                             "application/vnd.apache.parquet"),
    }
    for name, (path, body, content_type) in requests.items():
        status, reply, headers = call(url, path, body, content_type=content_type)
        assert status == 200, (name, reply)
        assert headers["X-Model-Version"] == "1" and headers["X-Variant"] == "primary"
        assert_same(reply["predictions"], want)
    # Health routes of every platform answer without a token.
    for path in ("/ping", "/health", VERTEX_HEALTH, "/ready", "/", "/version"):
        status, reply, _ = call(url, path, token=None)
        assert status == 200, (path, reply)
    assert call(url, "/version", token=None)[1]["variants"]["primary"]["version"] == "1"


def test_bad_requests_get_a_4xx_that_names_the_problem(server, expected):
    url, _ = server
    rows, _ = expected
    good = records(rows.head(2))
    without_age = [{k: v for k, v in r.items() if k != "age"} for r in good]
    cases = [
        ({"dataframe_records": [{**good[0], "age": "forty"}]}, "application/json", 400, "column 'age' row 0: expected a number"),
        ({"dataframe_records": without_age}, "application/json", 400, "missing required column(s) ['age']"),
        ({"dataframe_records": [{**good[0], "shoe_size": 42}]}, "application/json", 400, "unknown column(s) ['shoe_size']"),
        ({"dataframe_records": [{**good[0], "age": None}]}, "application/json", 400, "'age' is required but row 0 is null"),
        ({"dataframe_records": [{**good[0], "has_partner": "maybe"}]}, "application/json", 400, "expected true or false"),
        ({"dataframe_records": [{**good[0], "signup_date": "last tuesday"}]}, "application/json", 400, "ISO 8601"),
        ({"dataframe_records": [{**good[0], "plan": 3}]}, "application/json", 400, "'plan' row 0: expected a string"),
        ({"dataframe_records": []}, "application/json", 400, "the batch is empty"),
        ({"instances": [[1, 2, 3]]}, "application/json", 400, "row 0 has 3 values; the model takes 18"),
        ({"dataframe_split": {"columns": ["age"]}}, "application/json", 400, "'columns' (a list) and 'data'"),
        ({"rows": good}, "application/json", 400, "expected exactly one of the keys"),
        ([1, 2], "application/json", 400, "expected a JSON object"),
        (b'{"dataframe_records": [', "application/json", 400, "not valid JSON"),
        (b"", "application/json", 400, "the request body is empty"),
        (b"age,income\n40,abc\n", "text/csv", 400, "missing required column(s)"),
        (b"<xml/>", "application/xml", 415, "unsupported content type"),
        (b"PAR1 not really", "application/vnd.apache.parquet", 400, "not a valid Parquet file"),
        (b"x" * (11 * 1024 * 1024), "application/json", 413, "the limit is"),
    ]
    for body, content_type, status, message in cases:
        got, reply, _ = call(url, "/invocations", body, content_type=content_type)
        assert got == status and message in reply["message"], (body if not isinstance(body, bytes) else body[:60], got, reply)
    assert call(url, "/invocations", method="GET")[0] == 405
    assert call(url, "/nowhere")[0] == 404
    # the server is still healthy after all of that
    assert call(url, "/ping", token=None)[0] == 200


def test_auth_refuses_a_missing_or_wrong_token(server, expected):
    url, _ = server
    rows, _ = expected
    body = {"dataframe_records": records(rows.head(1))}
    status, reply, headers = call(url, "/invocations", body, token=None)
    assert status == 401 and "missing 'Authorization: Bearer" in reply["message"] and headers["WWW-Authenticate"] == "Bearer"
    assert call(url, "/invocations", body, token="wrong")[0] == 401
    assert call(url, "/metrics", token=None)[0] == 401
    assert call(url, "/admin/variants", token="wrong")[0] == 401
    assert call(url, "/invocations", body)[0] == 200


def test_metrics_and_the_prediction_log(server, expected):
    import pyarrow.parquet as pq

    url, log_uri = server
    rows, want = expected
    before = sum(o.size > 0 for o in storage.list_objects(log_uri)) if storage.exists(log_uri) else 0
    status, reply, headers = call(url, "/invocations", {"dataframe_records": records(rows)},
                                  headers={"X-Request-Id": "req-log-check"})
    assert status == 200
    assert call(url, "/invocations", {"dataframe_records": []})[0] == 400
    status, text, _ = call(url, "/metrics")
    assert status == 200
    assert 'mlfactory_requests_total{route="invocations",status="200"}' in text
    assert 'mlfactory_requests_total{route="invocations",status="400"}' in text
    assert "mlfactory_request_latency_seconds_bucket" in text
    assert 'mlfactory_model_version{model_uri="models:/churn_served@champion",variant="primary",version="1"} 1.0' in text

    deadline = time.monotonic() + 30
    logged = pd.DataFrame()
    while time.monotonic() < deadline:
        parts = [o for o in storage.list_objects(log_uri) if o.uri.endswith(".parquet")] if storage.exists(log_uri) else []
        if len(parts) > before:
            logged = pd.concat([pq.read_table(storage.local_path(o.uri)).to_pandas() for o in parts])
            if (logged["request_id"] == "req-log-check").sum() == len(rows):
                break
        time.sleep(0.3)
    mine = logged[logged["request_id"] == "req-log-check"].reset_index(drop=True)
    assert len(mine) == len(rows), "the prediction log did not reach the bucket"
    assert set(mine["model_version"]) == {"1"} and set(mine["variant"]) == {"primary"}
    assert mine["age"].tolist() == rows["age"].tolist()
    assert mine["probability"].to_numpy() == pytest.approx(want["probability"].to_numpy(), abs=1e-6)
    assert str(mine["served_at"].dtype).startswith("datetime64")


def test_the_fast_column_check_agrees_with_the_value_by_value_one():
    """Signature.typed takes whole columns at once when every value already has its JSON type; any
    other column goes value by value. Both must give the same values and the same errors."""
    from mlfactory.serving.payloads import BadRequest, InputColumn, Signature, _check

    columns = [InputColumn("when", "string", True, True), InputColumn("x", "double"), InputColumn("opt", "double", False),
               InputColumn("flag", "boolean"), InputColumn("n", "long")]
    signature = Signature(columns)

    def slow(given: dict) -> dict:
        return {c.name: [_check(c, v, i) for i, v in enumerate(given[c.name])] for c in columns}

    good = {"when": ["2024-01-01", "2024-02-03T04:05:06+01:00"], "x": [3, 2.5], "opt": [None, float("nan")],
            "flag": [True, False], "n": [4, 5.0]}
    assert signature.typed(good, 2) == slow(good) == {
        "when": ["2024-01-01", "2024-02-03T04:05:06+01:00"], "x": [3.0, 2.5], "opt": [None, None],
        "flag": [True, False], "n": [4, 5]}
    assert all(type(v) is float for v in signature.typed(good, 2)["x"])
    for column, values, message in [("when", ["2024-01-01", "soon"], "row 1: expected an ISO 8601"),
                                    ("x", [1.0, True], "row 1: expected a number"),
                                    ("x", [1.0, float("nan")], "required but row 1 is null"),
                                    ("flag", [True, 1], "row 1: expected true or false"),
                                    ("when", [None, "2024-01-01"], "required but row 0 is null"),
                                    ("n", [1, 2.5], "row 1: expected an integer")]:
        with pytest.raises(BadRequest, match=message):
            signature.typed({**good, column: values}, 2)
