"""No secret in the repository, and a scanner that would see one (conftest's ``no_secrets_in_what_the_suite_wrote``
runs it over every file the suite wrote, at the end of the session)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from secrets_scan import find_shapes, known_secrets, scan, written_files

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_holds_no_secret():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    paths = [ROOT / f for f in files if f and (ROOT / f).is_file()]
    assert len(paths) > 100
    assert scan(paths) == []


def test_the_scanner_sees_each_kind_of_secret(tmp_path):
    # (built here, so that this file holds none of them whole)
    samples = {
        "AWS access key id": "AKIA" + "Q3EXAMPLEKEY7XYZ",
        "private key": "-----BEGIN " + "RSA PRIVATE KEY-----",
        "GitHub token": "ghp_" + "a1B2" * 9,
        "Azure storage key": "AccountKey=" + "k3Y/" * 21 + "ab==",
        "JWT": "eyJ" + "hbGciOiJIUzI1NiJ9" + ".eyJ" + "zdWIiOiJhZG1pbiJ9" + "." + "s1gnatureS1gnature",
        "bearer token": "Authorization: Bearer " + "Zk3p9_Qw" * 4,
        "password in a URL": "postgresql://airflow:" + "n0t-a-placeholder" + "@db:5432/airflow",
        "password assignment": 'password = "' + "c0rrect-h0rse-battery" + '"',
    }
    for kind, text in samples.items():
        assert [name for name, _ in find_shapes(f"log line: {text} end")] == [kind], kind
    # placeholders and public test keys are not secrets
    for text in ("postgresql+psycopg2://USER:PASSWORD@HOST:5432/airflow", "db+postgresql://airflow:${POSTGRES_PASSWORD}@postgres",
                 "redis://:***@localhost:6379/0", "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="):
        assert find_shapes(text) == [], text
    # a value the suite generated is a leak wherever it shows, whatever its shape
    home = tmp_path / "airflow"
    (home / "logs" / "dag_id=x").mkdir(parents=True)
    (home / "passwords.json").write_text('{"admin": "plain-words-1234"}')
    (home / "airflow.cfg").write_text("[core]\nfernet_key = " + "fErNeT" * 7 + "=\n")
    (home / "logs" / "dag_id=x" / "attempt=1.log").write_text("user admin logged in with plain-words-1234\n")
    (home / "airflow.db").write_bytes(b"SQLite format 3\0" + b"\0" * 100 + b"fErNeT" * 7 + b"=" + b"\0" * 10)  # XCom
    (home / "summary.json").write_text('{"note": "nothing here"}')
    (home / ".env").write_text("AIRFLOW_ADMIN_PASSWORD=generated-pass-5678\nMLFACTORY_MODEL_NAME=customer_churn\n")
    # a setting is no secret; the Fernet key is one
    assert known_secrets(tmp_path) == {"plain-words-1234", "generated-pass-5678", "fErNeT" * 7 + "="}
    assert written_files(tmp_path) == sorted(home / n for n in ("airflow.db", "logs/dag_id=x/attempt=1.log", "summary.json"))
    findings = scan(written_files(tmp_path), known_secrets(tmp_path))
    assert len(findings) == 2 and all("a generated secret" in f for f in findings), findings
    assert {f.split(":")[0] for f in findings} == {str(home / "airflow.db"), str(home / "logs/dag_id=x/attempt=1.log")}
    import shutil

    shutil.rmtree(home)  # the planted leaks must not fail the session's own scan
