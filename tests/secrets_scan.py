"""Secret-looking strings: in the repository's files (test_no_secrets), and in everything the test suite writes
(conftest's ``no_secrets_in_what_the_suite_wrote``, over the session's temporary folders): logs, Airflow's and
MLflow's databases (XCom, params, tags), run summaries, the buckets' files.

Two kinds of finding:
- **shapes**: cloud keys, private keys, bearer tokens and JWTs, passwords in connection strings and URLs
  (a placeholder such as ``${POSTGRES_PASSWORD}``, ``PASSWORD``, ``***`` is none), in text files;
- **known values**: the secrets the suite itself generated (Airflow's Fernet key, JWT secret and admin password,
  the model server's tokens, .env files): any of them in any file but the one that keeps it is a leak, whatever
  its shape, text or binary (a SQLite page, a Parquet column).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# public, documented test credentials: Azurite's well-known account key
PUBLIC = {"Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="}

SHAPES = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key[\"']?\s*[=:]\s*[\"']?([A-Za-z0-9/+=]{40})\b"),
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "Azure storage key": re.compile(r"AccountKey=([A-Za-z0-9+/]{86}==)"),
    "Azure SAS signature": re.compile(r"[?&]sig=([A-Za-z0-9%+/=]{30,})"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "bearer token": re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{20,}=*)"),
    "password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^@\s/'\"]{6,})@"),
    "password assignment": re.compile(r"(?i)\b(?:password|passwd|secret|api_key|token)[\"']?\s*[=:]\s*[\"']([^\"'\s]{12,})[\"']"),
}


def _placeholder(value: str) -> bool:
    """Not a secret: a variable, a placeholder, a public test key, or a test fixture's value (``test-...``)."""
    return (value.startswith(("$", "{", "<", "%(", "test-", "fake-")) or set(value) <= set("*x.-")
            or value.isupper()
            or "..." in value or value.lower() in {"password", "testing", "secret"})


# What each shape cannot do without (lower case): a pattern runs only on text that holds one of these, so
# megabytes of landed CSV cost a few substring searches, not a dozen regular expressions.
ANCHORS = {"AWS access key id": ("akia", "asia"), "AWS secret access key": ("aws_secret_access_key",),
           "private key": ("private key-----",), "GitHub token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
           "Slack token": ("xox",), "Google API key": ("aiza",), "Azure storage key": ("accountkey=",),
           "Azure SAS signature": ("sig=",), "JWT": ("eyj",), "bearer token": ("bearer",), "password in a URL": ("://",),
           "password assignment": ("password", "passwd", "secret", "api_key", "token")}


def find_shapes(text: str) -> list[tuple[str, str]]:
    found = []
    lowered = text.lower()
    for name, pattern in SHAPES.items():
        if not any(anchor in lowered for anchor in ANCHORS[name]):
            continue
        for match in pattern.finditer(text):
            value = match.group(1) if pattern.groups else match.group(0)
            free_text = name in ("password in a URL", "password assignment", "bearer token")  # where placeholders go
            if value not in PUBLIC and not (free_text and _placeholder(value)):
                found.append((name, value))
    return found


# The files that keep a secret (mode 600): the one place each may be. (key.pem: the TLS key of the suite's local
# HTTPS fake of Azure ML's API)
SECRET_STORES = {"jwt_secret", "token", "admin-token", "passwords.json", ".env", "airflow.cfg", "key.pem"}
TEXT_SCAN_BYTES = 32 * 1024 * 1024  # shapes are looked for in text files up to this size (known values: in every file)


def known_secrets(root: Path) -> set[str]:
    """The secrets generated under ``root`` by the suite: values of Airflow's Fernet key, jwt_secret and
    passwords.json, the model server's token files and admin tokens, and .env files."""
    values: set[str] = set()
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        try:
            if path.name in ("jwt_secret", "token", "admin-token"):
                values.add(path.read_text().strip())
            elif path.name == "airflow.cfg":
                values |= set(re.findall(r"(?m)^fernet_key\s*=\s*(\S+)", path.read_text()))
            elif path.name == "passwords.json":
                values |= {str(v) for v in json.loads(path.read_text()).values()}
            elif path.name == ".env":  # its secrets, not its settings (MLFACTORY_MODEL_NAME=customer_churn is none)
                pairs = [line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#")]
                values |= {value.strip() for key, value in pairs if re.search(r"PASSWORD|SECRET|TOKEN|FERNET|_KEY", key)}
        except (OSError, ValueError, UnicodeDecodeError):
            continue
    return {v for v in values if len(v) >= 12}


def written_files(root: Path) -> list[Path]:
    """Every file under ``root`` but the secret stores: logs, databases, summaries, bucket objects."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.name not in SECRET_STORES)


def scan(paths: list[Path], known: set[str] = frozenset()) -> list[str]:
    findings = []
    wanted = [(value, value.encode()) for value in known]
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        findings += [f"{path}: a generated secret ({value[:4]}…)" for value, raw in wanted if raw in data]
        if len(data) <= TEXT_SCAN_BYTES and b"\0" not in data[:8192]:  # text: look for shapes too
            findings += [f"{path}: {name} {value[:6]}…" for name, value in find_shapes(data.decode(errors="replace"))]
    return findings
