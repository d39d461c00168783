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
from conftest import serving_container

from mlfactory import storage
from mlfactory.backends.local.processes import answers, free_port, stop_group

TOKEN = "test-token-0123456789"
ADMIN_TOKEN = "test-admin-token-9876543210"
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
    port, admin_port = free_port(), free_port()
    log_uri = storage.join(cfg.storage.bucket, "predictions", "serving")
    home = tmp_path_factory.mktemp("server")
    tokens = home / "tokens.json"
    tokens.write_text("{}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri, "MLFACTORY_SERVING_TOKEN": TOKEN,
           "MLFACTORY_SERVING_TOKENS_FILE": str(tokens), "MLFACTORY_SERVING_ADMIN_TOKEN": ADMIN_TOKEN,
           "MLFACTORY_RUNTIME": "gcp", "AIP_PREDICT_ROUTE": VERTEX_PREDICT, "AIP_HEALTH_ROUTE": VERTEX_HEALTH, "AIP_HTTP_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"  # the port came from AIP_HTTP_PORT, as on Vertex AI
    # as the clouds' serving containers are started here (the command's own start is tested below)
    ready = lambda: answers(f"{url}/ping", ok_only=True)  # noqa: E731
    proc = serving_container(env, home / "server.log", ready, "the model server", (
        "--model-uri", f"models:/{cfg.model_name}@champion", "--host", "127.0.0.1", "--log-uri", log_uri,
        "--log-flush-seconds", "0.5", "--admin-port", str(admin_port), "--allowed-model", cfg.model_name,
        "--max-concurrent", "3", "--body-timeout", "3", "--head-timeout", "2"))
    yield url, log_uri, f"http://127.0.0.1:{admin_port}", tokens
    stop_group(proc)


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


def assert_same(predictions: list[dict], want: pd.DataFrame, ids: list[str] | None = None) -> None:
    """The predictions are ``want``'s; with ``ids``, each also carries its row's id (the config's string column)."""
    assert len(predictions) == len(want)
    got = pd.DataFrame(predictions)
    if ids is not None:
        assert list(got.columns)[0] == "customer_id" and got.pop("customer_id").tolist() == ids
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


def named_requests(rows: pd.DataFrame) -> dict[str, tuple[str, object, str]]:
    """``rows`` in each platform's request format that names its columns: name -> (path, body, content type)."""
    recs = records(rows)
    split = {"columns": list(rows.columns), "data": [[r[c] for c in rows.columns] for r in recs]}
    return {
        "mlflow dataframe_split": ("/invocations", {"dataframe_split": split}, "application/json"),
        "mlflow dataframe_records": ("/invocations", {"dataframe_records": recs}, "application/json"),
        "mlflow instances": ("/invocations", {"instances": recs}, "application/json"),
        "mlflow inputs (columnar)": ("/invocations", {"inputs": {c: [r[c] for r in recs] for c in rows.columns}},
                                     "application/json"),
        "mlflow csv / sagemaker text/csv": ("/invocations", rows.to_csv(index=False).encode(), "text/csv"),
        "vertex ai instances as objects": (VERTEX_PREDICT, {"instances": recs}, "application/json"),
        "azure ml input_data": ("/score", {"input_data": {**split, "index": list(range(len(recs)))}}, "application/json"),
        "json lines": ("/invocations", "\n".join(json.dumps(r) for r in recs).encode(), "application/jsonlines"),
    }


def test_every_platform_format_gives_the_pyfuncs_predictions(server, expected, champion):
    url = server[0]
    rows, want = expected
    typed = champion[2].head(len(rows))
    assert set(typed.columns) - set(rows.columns) and (typed["age"].to_numpy() == rows["age"].to_numpy()).all()
    recs = records(rows)
    requests = {
        **named_requests(rows),
        "vertex ai instances as lists": (VERTEX_PREDICT, {"instances": [[r[c] for c in rows.columns] for r in recs],
                                                          "parameters": {}}, "application/json"),
    }
    for name, (path, body, content_type) in requests.items():
        status, reply, headers = call(url, path, body, content_type=content_type)
        assert status == 200, (name, reply)
        assert headers["X-Model-Version"] == "1" and headers["X-Variant"] == "primary"
        assert_same(reply["predictions"], want)
    # A row of the user's own file, its id and its label beside the features, is taken as it is in every format
    # that names columns: the model ignores them, and each prediction carries the row's id back. (A curated file,
    # as a SageMaker batch transform sends it, holds them too.)
    ids = typed["customer_id"].tolist()
    full = rows.assign(churned=typed["churned"].to_numpy())
    full.insert(3, "customer_id", ids)
    for name, (path, body, content_type) in {
            **named_requests(full),
            "sagemaker batch transform: a curated parquet file": ("/invocations", curated_parquet(typed),
                                                                 "application/vnd.apache.parquet")}.items():
        status, reply, _ = call(url, path, body, content_type=content_type)
        assert status == 200, (name, reply)
        assert_same(reply["predictions"], want, ids)
    # Health routes of every platform answer without a token, and say nothing of what is served.
    for path in ("/ping", "/health", VERTEX_HEALTH, "/ready", "/"):
        status, reply, _ = call(url, path, token=None)
        assert status == 200 and "1" not in json.dumps(reply), (path, reply)
    assert call(url, "/version", token=None)[0] == 401
    assert call(url, "/version")[1]["variants"]["primary"]["version"] == "1"
    # SageMaker batch transform's line formats (SplitType Line): bare CSV rows in signature order and JSON
    # lines, answered line by line as asked (AssembleWith Line)
    bare_csv = rows.to_csv(index=False, header=False).encode()
    status, reply, headers = call(url, "/invocations", bare_csv, content_type="text/csv", headers={"Accept": "text/csv"})
    assert status == 200 and headers["Content-Type"] == "text/csv"
    lines = reply.splitlines()
    assert len(lines) == len(want) and [line.split(",")[0] for line in lines] == [str(p) for p in want["prediction"]]
    assert [float(line.split(",")[1]) for line in lines] == pytest.approx(want["probability"].tolist(), abs=1e-6)
    jsonl = "\n".join(json.dumps(r) for r in recs).encode()
    status, reply, _ = call(url, "/invocations", jsonl, content_type="application/jsonlines",
                            headers={"Accept": "application/jsonlines"})
    assert status == 200
    assert_same([json.loads(line) for line in reply.splitlines()], want)
    as_lists = "\n".join(json.dumps([r[c] for c in rows.columns]) for r in recs).encode()
    assert_same(call(url, "/invocations", as_lists, content_type="application/jsonlines")[1]["predictions"], want)


def test_bad_requests_get_a_4xx_that_names_the_problem(server, expected):
    url = server[0]
    rows, _ = expected
    good = records(rows.head(2))
    without_age = [{k: v for k, v in r.items() if k != "age"} for r in good]
    cases = [
        ({"dataframe_records": [{**good[0], "age": "forty"}]}, "application/json", 400, "column 'age' row 0: expected a number"),
        ({"dataframe_records": without_age}, "application/json", 400, "missing required column(s) ['age']"),
        ({"dataframe_records": [{**good[0], "shoe_size": 42}]}, "application/json", 400, "unknown column(s) ['shoe_size']"),
        ({"dataframe_records": [{**good[0], "customer_id": {"a": 1}}]}, "application/json", 400,
         "column 'customer_id' row 0: expected a plain value"),
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
    url = server[0]
    rows, _ = expected
    body = {"dataframe_records": records(rows.head(1))}
    status, reply, headers = call(url, "/invocations", body, token=None)
    assert status == 401 and "missing 'Authorization: Bearer" in reply["message"] and headers["WWW-Authenticate"] == "Bearer"
    assert call(url, "/invocations", body, token="wrong")[0] == 401
    assert call(url, "/metrics", token=None)[0] == 401
    assert call(url, "/invocations", body)[0] == 200
    # without a client token predict is open: so such a server listens on loopback only (0.0.0.0 was the default)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFACTORY_SERVING_", "MLFACTORY_RUNTIME"))}
    refused = subprocess.run([sys.executable, "-m", "mlfactory.serving", "--port", str(free_port())], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--host 0.0.0.0 takes requests from other machines: set client tokens" in refused.stderr


def test_clients_cannot_reach_the_admin_api_and_it_loads_only_the_configured_model(server, expected, champion):
    """Client tokens are predict-only and revocable; the admin API answers only on its own port, only to the
    admin token, and loads only models:/<the configured model>/<version>."""
    url, _, admin, tokens = server
    cfg = champion[0]
    rows, _ = expected
    body = {"dataframe_records": records(rows.head(1))}
    # the public port has no admin API, whatever the token
    for token in (TOKEN, ADMIN_TOKEN):
        assert call(url, "/admin/variants", token=token)[0] in (401, 404)
    assert call(url, "/admin/variants", {"model_uri": f"models:/{cfg.model_name}/1"}, method="PUT")[0] == 404
    assert call(url, "/invocations", body, token=ADMIN_TOKEN)[0] == 401  # the admin's token is not a client's
    # the admin port takes the admin token only
    assert call(admin, "/admin/variants", token=TOKEN)[0] == 401
    status, reply, _ = call(admin, "/admin/variants", token=ADMIN_TOKEN)
    assert status == 200 and [v["name"] for v in reply["variants"]] == ["primary"]
    for uri in ("runs:/0123/model", "/tmp/evil", f"models:/{cfg.model_name}@champion", "models:/other_model/1",
                f"models:/{cfg.model_name}/1/../../x", f"file:///{cfg.model_name}/1"):
        status, reply, _ = call(admin, "/admin/variants/evil", {"model_uri": uri, "weight": 0}, method="PUT",
                                token=ADMIN_TOKEN)
        assert status == 403 and f"models:/{cfg.model_name}/<version>" in reply["message"], (uri, status, reply)
    status, reply, _ = call(admin, "/admin/variants/green", {"model_uri": f"models:/{cfg.model_name}/1", "weight": 0},
                            method="PUT", token=ADMIN_TOKEN)
    assert status == 201 and reply["version"] == "1"
    assert call(admin, "/admin/variants/green", method="DELETE", token=ADMIN_TOKEN)[0] == 200
    # several client tokens, revoked without a restart, stored as hashes only
    cli = [sys.executable, "-m", "mlfactory.serving.auth"]
    new = subprocess.run([*cli, "add", "--file", str(tokens), "analytics"], capture_output=True, text=True, check=True).stdout.strip()
    assert len(new) >= 32 and new not in tokens.read_text() and tokens.stat().st_mode & 0o077 == 0
    assert call(url, "/invocations", body, token=new)[0] == 200 and call(url, "/invocations", body)[0] == 200
    subprocess.run([*cli, "revoke", "--file", str(tokens), "analytics"], check=True)
    assert call(url, "/invocations", body, token=new)[0] == 401
    gone = subprocess.run([*cli, "revoke", "--file", str(tokens), "analytics"], capture_output=True, text=True)
    assert gone.returncode == 2 and "no client 'analytics'" in gone.stderr


def raw_request(url: str, head: bytes, body: bytes = b"", wait: float = 10) -> bytes:
    """Bytes over a plain socket (what urllib will not send): the answer's first bytes."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        try:
            return sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return b""


def test_hostile_requests_get_a_clear_answer_and_hold_nothing(server, expected):
    import gzip
    import io
    import socket

    import pyarrow as pa
    import pyarrow.parquet as pq

    url = server[0]
    rows, want = expected
    good = {"dataframe_records": records(rows.head(2))}
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # a gzip bomb: 1 KiB on the wire, far over the limit once inflated; a good gzip body is served
    bomb = gzip.compress(b"[" * (40 * 1024 * 1024))
    status, reply, _ = call(url, "/invocations", bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and "inflates to more than" in reply["message"]
    status, reply, _ = call(url, "/invocations", gzip.compress(json.dumps(good).encode()), headers={"Content-Encoding": "gzip"})
    assert status == 200 and len(reply["predictions"]) == 2
    assert call(url, "/invocations", b"x", headers={"Content-Encoding": "br"})[0] == 415
    # a Parquet bomb: one highly compressible column of 2M rows, refused from its footer
    buffer = io.BytesIO()
    pq.write_table(pa.table({"age": pa.array([40.0] * 2_000_000)}), buffer, compression="zstd")
    assert len(buffer.getvalue()) < 1024 * 1024
    status, reply, _ = call(url, "/invocations", buffer.getvalue(), content_type="application/vnd.apache.parquet")
    assert status == 413 and "more than 1000000 rows" in reply["message"]
    # a Parquet bomb its footer does not show: a signature column sent as a struct (4 KiB that decoded to 100 MB)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"age": pa.array([{"a": "x" * 1000}] * 100_000)}), buffer, compression="zstd")
    status, reply, _ = call(url, "/invocations", buffer.getvalue(), content_type="application/vnd.apache.parquet")
    assert status == 400 and "'age (struct<a: string>)'" in reply["message"] and "nested" in reply["message"], reply
    # ... or a dictionary-encoded text column: one 1 MiB value, 600 rows pointing at it (600 MiB decoded)
    buffer = io.BytesIO()
    big = {c: [v] * 600 for c, v in records(rows.head(1))[0].items()} | {"plan": ["p" * 1024 * 1024] * 600}
    pq.write_table(pa.table(big), buffer, compression="zstd", use_dictionary=True)
    assert len(buffer.getvalue()) < 1024 * 1024
    status, reply, _ = call(url, "/invocations", buffer.getvalue(), content_type="application/vnd.apache.parquet")
    assert status == 413 and "decode to more than" in reply["message"], reply
    # rows are limited in every format, counted before any value is checked (a 10 MiB JSON body held 1.31 M rows)
    for body, content_type in [(json.dumps({"instances": [[0] * 18] * 100_001}).encode(), "application/json"),
                               (b"0\n" * 100_001, "text/csv"), (b"[0]\n" * 100_001, "application/jsonlines")]:
        status, reply, _ = call(url, "/invocations", body, content_type=content_type)
        assert status == 413 and "more than 100000 rows" in reply["message"], (content_type, reply)
    # Parquet (batch transform) has a higher body limit than JSON: a 15 MiB file is read, not refused for size
    noise = [os.urandom(8 * 1024 * 1024).hex()] + [""] * (len(rows) - 1)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"age": rows["age"].tolist(), "pad": noise}), buffer, compression="none")
    assert len(buffer.getvalue()) > 10 * 1024 * 1024
    status, reply, _ = call(url, "/invocations", buffer.getvalue(), content_type="application/vnd.apache.parquet")
    assert status == 400 and "missing required column(s)" in reply["message"]
    # JSON nested past the parser's guard
    status, reply, _ = call(url, "/invocations", b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and "nested too deeply" in reply["message"]
    # a request id that is too long or carries other characters (it goes into logs and the prediction log)
    for bad in ("x" * 129, "a b", "id\u00e9"):
        status, reply, _ = call(url, "/invocations", good, headers={"X-Request-Id": bad.encode("latin-1").decode("latin-1")})
        assert status == 400 and "X-Request-Id" in reply["message"], bad
    # headers past 16 KiB: a 431 and the connection closed, not a buffer grown without end
    answer = raw_request(url, b"POST /invocations HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Junk: " + b"a" * 64 * 1024 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nX-Junk: ")
        for _ in range(40):  # a header that never ends, 1 KiB at a time
            time.sleep(0.01)
            try:
                sock.sendall(b"a" * 1024)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert sock.recv(4096).startswith(b"HTTP/1.1 431")
    # a slow client: its body must arrive within --body-timeout (3 s); it gets a 408 and holds no worker
    started = time.monotonic()
    answer = raw_request(url, b"POST /invocations HTTP/1.1\r\nHost: x\r\n" + auth +
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n", b'{"dataframe', wait=20)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 15, answer[:200]
    # clients still sending their bodies hold no slot of --max-concurrent (3): with 5 of them, a request is served
    slow = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20)
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n" + auth +
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        slow.append(sock)
    time.sleep(0.5)
    assert call(url, "/invocations", good)[0] == 200
    for sock in slow:
        sock.close()
    # past 3 requests being decoded and predicted: a 503 with Retry-After, and the others are served
    from concurrent.futures import ThreadPoolExecutor

    heavy = {"dataframe_records": records(rows) * 800}  # 20,000 rows (8 MiB): a few tenths of a second each
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: call(url, "/invocations", heavy), range(8)))
    busy = [(reply, headers) for status, reply, headers in answers if status == 503]
    assert busy and all(h["Retry-After"] == "1" and "3 requests in flight" in r["message"] for r, h in busy), answers
    assert {status for status, _, _ in answers} == {200, 503}
    # 200 sockets that never finish their headers (or send nothing) lock no one out: uvicorn's limit_concurrency
    # counted them and answered every other request 503, /live included. Each is cut at --head-timeout (2 s).
    waiting = []
    for i in range(200):
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20)
        if i % 2:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        waiting.append(sock)
    try:
        started = time.monotonic()
        assert call(url, "/invocations", good)[0] == 200 and call(url, "/ping", token=None)[0] == 200
        answers = [sock.recv(64) for sock in waiting]
        assert time.monotonic() - started < 15
        assert {a[:12] for a in answers} == {b"HTTP/1.1 408"}, {a[:12] for a in answers}
    finally:
        for sock in waiting:
            sock.close()


def test_metrics_and_the_prediction_log(server, expected):
    import pyarrow.parquet as pq

    url, log_uri = server[:2]
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


def test_no_code_stored_with_a_model_is_ever_run(server, champion, tmp_path):
    """Whoever can write to the registry or its artifact store gets no code run by the server, batch scoring
    or the gate: a pickled pyfunc is refused before it is unpickled, and a bundle that is a pickle bomb is
    refused by torch.load(weights_only=True). Our own models are MLflow models-from-code: nothing pickled."""
    import mlflow
    import torch

    from mlfactory.registry import Registry
    from mlfactory.tabular import load_logged_model

    cfg = champion[0]
    admin, marker = server[2], tmp_path / "pwned"

    class Evil(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run(run_name="evil"):
        evil_uri = mlflow.pyfunc.log_model(name="model", python_model=Evil()).model_uri
    marker.unlink(missing_ok=True)  # (MLflow's own pip inference just ran it here, in the test: that is the attack)
    version = Registry(cfg).register(evil_uri, None, {})
    status, reply, _ = call(admin, "/admin/variants/evil", {"model_uri": f"models:/{cfg.model_name}/{version}"},
                            method="PUT", token=ADMIN_TOKEN)
    assert status == 422 and "refusing to load it" in reply["message"] and "python_model.pkl" in reply["message"]
    assert not marker.exists()

    # our own model: models-from-code, and no pickle anywhere in it
    ours = mlflow.artifacts.download_artifacts(f"models:/{cfg.model_name}/1", dst_path=str(tmp_path / "ours"))
    assert not [p for p in os.listdir(ours) if p.endswith(".pkl")] and os.path.exists(os.path.join(ours, "model_code.py"))
    # the same model with its bundle swapped for a pickle bomb
    bundle = os.path.join(ours, "artifacts", "model.pt")
    torch.save({"state_dict": Evil()}, bundle)
    marker.unlink(missing_ok=True)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        load_logged_model(ours)
    assert not marker.exists()


def test_a_model_that_hangs_gets_a_504_and_holds_no_one_else():
    """The forward pass runs on the server's worker thread: a model that never answers costs its callers a 504
    after --predict-timeout, and the event loop goes on answering everything else meanwhile."""
    import asyncio
    import threading

    from mlfactory.serving.app import ModelServer, Variant
    from mlfactory.serving.limits import Limits
    from mlfactory.serving.payloads import BadRequest

    release = threading.Event()

    class Hung:
        version, model_uri = "9", "models:/m/9"

        def predict(self, columns):
            release.wait(30)
            return {"prediction": [0] * len(next(iter(columns.values())))}

    server = ModelServer(limits=Limits(predict_timeout_s=0.5))
    variant = Variant("blue", Hung(), 100.0)

    async def scenario():
        started = time.monotonic()
        hung = asyncio.create_task(server.predict(variant, {"x": [1.0]}, 1))
        await asyncio.sleep(0.1)
        assert server.ready is False and not hung.done()  # (no variant registered: the loop still answers)
        with pytest.raises(BadRequest) as err:
            await hung
        assert err.value.status == 504 and "did not answer within 0.5s" in err.value.message
        assert "version 9" in err.value.message and 0.4 < time.monotonic() - started < 5
        release.set()
        await asyncio.sleep(0.2)  # the late answer finds its caller gone: nothing breaks

    asyncio.run(scenario())
    server.worker.shutdown(wait=True)


def test_a_gzip_body_is_inflated_behind_the_loop_and_a_bomb_is_still_refused():
    """Inflating runs on its own thread, niced 10 below the server (on a busy core the loop and the forward passes
    go first: the soak's gzip bombs cost the well-behaved client's p99 ~1.9x without it); it still answers."""
    import asyncio
    import gzip

    from mlfactory.serving.app import ModelServer
    from mlfactory.serving.limits import Limits
    from mlfactory.serving.payloads import BadRequest

    server = ModelServer(limits=Limits())
    headers = {b"content-encoding": b"gzip"}

    def receiving(body: bytes):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}
        return receive

    async def scenario():
        assert await server._body(headers, receiving(gzip.compress(b'{"instances": [1]}')), 1024) == b'{"instances": [1]}'
        with pytest.raises(BadRequest) as err:
            await server._body(headers, receiving(gzip.compress(b" " * 4096)), 1024)
        assert err.value.status == 413 and "inflates to more than 1024 bytes" in err.value.message
        return await asyncio.get_running_loop().run_in_executor(server.inflater, os.getpriority, os.PRIO_PROCESS, 0)

    inflating_nice = asyncio.run(scenario())
    server.inflater.shutdown(wait=True)
    assert inflating_nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)


def test_labels_that_arrive_later_judge_the_champion_on_what_it_served(server, champion):
    """Callers' requests are served and logged with their X-Request-Id and each row's position; the truth
    arrives later as label files keyed by (request_id, row). ml_monitor's check waits for labels whose
    served rows are not found, takes a file once, refuses one without the target column, and sees the
    champion's metric fall when the served rows' labels turn against it."""
    import pyarrow.parquet as pq

    from mlfactory.data import sample_data
    from mlfactory.features import to_wire
    from mlfactory.monitoring.monitor import check

    url, log_uri = server[:2]
    cfg = champion[0]
    cfg = cfg.model_copy(update={"monitoring": cfg.monitoring.model_copy(update={"min_rows": 500}),
                                 "ingest": cfg.ingest.model_copy(update={"settle_s": 0})})  # files written whole here
    labels_uri = cfg.storage.labels_uri

    def serve(frame: pd.DataFrame, prefix: str) -> list[str]:
        ids = []
        wire = to_wire(frame, cfg.dataset)
        for i in range(0, len(frame), 50):
            ids += [f"{prefix}-{i}"] * len(wire.iloc[i:i + 50])
            status, _, headers = call(url, "/invocations", {"dataframe_records": records(wire.iloc[i:i + 50])},
                                      headers={"X-Request-Id": f"{prefix}-{i}"})
            assert status == 200 and headers["X-Request-Id"] == f"{prefix}-{i}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the log is flushed every 0.5 s
            ids_logged = [i for o in storage.list_objects(log_uri) if o.uri.endswith(".parquet")
                          for i in pq.read_table(storage.local_path(o.uri), columns=["request_id"]).column(0).to_pylist()]
            if sum(i.startswith(prefix + "-") for i in ids_logged) == len(frame):
                break
            time.sleep(0.3)
        return ids

    def labels_of(frame: pd.DataFrame, ids: list[str], flip: bool = False) -> pd.DataFrame:
        rows = [int(i.rsplit("-", 1)[1]) for i in ids]
        truth = frame["churned"].to_numpy() != flip
        return pd.DataFrame({"request_id": ids, "row": [n - r for n, r in zip(range(len(ids)), rows)], "churned": truth})

    first = sample_data.generate(1500, seed=61).to_pandas()
    labels = labels_of(first, serve(first, "season1"))
    text = labels.assign(churned=labels["churned"].map({True: "yes", False: "no"})).to_csv(index=False)
    text += "season1-never-served,0,yes\nseason1-0,3,maybe\n"  # one label of no served row, one that is no label
    storage.write_bytes(storage.join(labels_uri, "2026-12-01.csv"), text.encode())
    storage.write_bytes(storage.join(labels_uri, "no-target.csv"), b"request_id,row,label\nseason1-0,0,yes\n")
    storage.write_bytes(storage.join(labels_uri, "late.jsonl"), b'{"request_id": "never-served", "churned": true}\n')

    waiting = check(cfg, "labels-1")["served_performance"]  # the never-served label may still find its row
    assert not waiting["checked"] and waiting["why"] == "0 served rows with labels; waiting for 500", waiting
    files = waiting["label_files"]
    assert files["2026-12-01.csv"]["status"] == "waiting" and files["2026-12-01.csv"]["matched"] == 1500
    assert files["2026-12-01.csv"]["invalid"] == 1
    assert files["no-target.csv"]["status"] == "refused"
    assert "needs the columns 'request_id', 'churned'" in files["no-target.csv"]["why"]

    # What ml_promote records when it promotes a version: its metric on the frozen holdout (the sample's ~0.81)
    from mlfactory.registry import Registry

    client = Registry(cfg).client
    client.set_model_version_tag(cfg.model_name, "1", "mlfactory.holdout_roc_auc", "0.81")
    try:
        _judge_labels(cfg, labels_uri, serve, labels_of)
    finally:
        client.delete_model_version_tag(cfg.model_name, "1", "mlfactory.holdout_roc_auc")


def _judge_labels(cfg, labels_uri, serve, labels_of):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlfactory.data import sample_data
    from mlfactory.monitoring.monitor import check

    impatient = cfg.model_copy(update={"monitoring": cfg.monitoring.model_copy(update={"label_wait_hours": 0})})
    judged = check(impatient, "labels-2")
    served = judged["served_performance"]
    assert served["checked"] and served["source"] == "served" and served["rows"] == 1500, served
    assert served["label_files"]["2026-12-01.csv"]["unmatched_examples"] == [{"request_id": "season1-never-served", "row": 0}]
    assert "no-target.csv" not in served["label_files"]  # refused once, recorded, not read again
    late = served["label_files"]["late.jsonl"]  # waited long enough: taken with nothing to give, reported
    assert late["status"] == "taken" and late["matched"] == 0
    assert late["unmatched_examples"] == [{"request_id": "never-served", "row": 0}]
    assert not served["degraded"] and served["value"] > 0.75 and "performance" not in judged["reasons"]
    assert check(impatient, "labels-3")["served_performance"]["why"] == "no new labels of served rows"

    # The season turns: the same kind of customers, but the outcomes reverse. The labels say so.
    second = sample_data.generate(1500, seed=62).to_pandas()
    flipped = labels_of(second, serve(second, "season2"), flip=True)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(flipped, preserve_index=False), buffer)
    storage.write_bytes(storage.join(labels_uri, "2026-12-02.parquet"), buffer.getvalue())
    turned = check(impatient, "labels-4")
    served = turned["served_performance"]
    assert served["checked"] and served["degraded"] and served["value"] < 0.3 and served["rows"] == 1500, \
        {k: served.get(k) for k in ("value", "baseline", "drop", "rows", "label_files")}
    assert "performance" in turned["reasons"] and turned["drift"]
    history = json.loads(storage.read_bytes(storage.join(cfg.storage.reports_uri, "drift", "_performance.json")))
    assert [h["source"] for h in history if h["run"] in ("labels-2", "labels-4")] == ["served", "served"]
