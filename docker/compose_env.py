"""Write .env for docker-compose.yaml from .env.example: every empty secret generated, AIRFLOW_UID set to the
caller's uid. An existing .env is left as it is (its secrets are in use by the database volume).

    python3 docker/compose_env.py [--example .env.example] [--out .env]
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
from pathlib import Path

GENERATED = {
    "POSTGRES_PASSWORD": lambda: secrets.token_urlsafe(24),
    "REDIS_PASSWORD": lambda: secrets.token_urlsafe(24),
    "AIRFLOW_FERNET_KEY": lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    "AIRFLOW_JWT_SECRET": lambda: secrets.token_hex(64),
    "AIRFLOW_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(16),
    "MLFLOW_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(16),
    "MLFLOW_SECRET_KEY": lambda: secrets.token_hex(32),
    "MLFACTORY_SERVING_TOKEN": lambda: secrets.token_urlsafe(32),
    "MLFACTORY_SERVING_ADMIN_TOKEN": lambda: secrets.token_urlsafe(32),
}


def render(example: str, uid: int) -> str:
    lines = []
    for line in example.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            if name in GENERATED and not value:
                value = GENERATED[name]()
            elif name == "AIRFLOW_UID":
                value = str(uid)
            line = f"{name}={value}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--example", type=Path, default=Path(".env.example"))
    p.add_argument("--out", type=Path, default=Path(".env"))
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists: kept as it is")
        return 0
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # secrets: readable by their owner alone
    with os.fdopen(fd, "w") as out:
        out.write(render(args.example.read_text(), os.getuid()))
    print(f"wrote {args.out} (mode 600): the UI's login is admin / AIRFLOW_ADMIN_PASSWORD in it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
