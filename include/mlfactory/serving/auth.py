"""Who may call the model server: predict-only client tokens (several, revocable) and one admin credential.

- **Clients** present ``Authorization: Bearer <token>`` on the public port. A token is one of
  ``MLFACTORY_SERVING_TOKEN`` (one token, for the simple case) or the tokens file
  (``MLFACTORY_SERVING_TOKENS_FILE``: name -> SHA-256 of the token; the server rereads it when it
  changes, so ``revoke`` takes effect at once and no token is stored in clear).
- **The admin** (ml_deploy) presents ``MLFACTORY_SERVING_ADMIN_TOKEN`` on the admin port only; a client
  token never opens the admin API, and the admin token is not accepted on the public port.

Manage client tokens (prints the new token once; keep it, only its hash is stored)::

    python -m mlfactory.serving.auth add    --file tokens.json analytics-team
    python -m mlfactory.serving.auth revoke --file tokens.json analytics-team
    python -m mlfactory.serving.auth list   --file tokens.json
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path

CLIENT_TOKEN_ENV = "MLFACTORY_SERVING_TOKEN"
TOKENS_FILE_ENV = "MLFACTORY_SERVING_TOKENS_FILE"
ADMIN_TOKEN_ENV = "MLFACTORY_SERVING_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_token(token: str, what: str) -> str:
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{what} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} random ones "
                         f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


class Credentials:
    """The tokens a server accepts. No client token configured: predict and metrics are open (a server
    on 127.0.0.1 for one user); the admin API is off without an admin token."""

    def __init__(self, client_token: str | None = None, tokens_file: str | None = None, admin_token: str | None = None):
        self._fixed = {"default": digest(check_token(client_token, CLIENT_TOKEN_ENV))} if client_token else {}
        self.tokens_file = Path(tokens_file) if tokens_file else None
        self.admin_digest = digest(check_token(admin_token, ADMIN_TOKEN_ENV)) if admin_token else None
        self._file_stamp: tuple | None = None
        self._from_file: dict[str, str] = {}
        if self.tokens_file is not None:
            self._reload()  # a missing or malformed file stops the server at start, not at the first request

    @classmethod
    def from_env(cls, env=os.environ) -> Credentials:
        return cls(env.get(CLIENT_TOKEN_ENV) or None, env.get(TOKENS_FILE_ENV) or None, env.get(ADMIN_TOKEN_ENV) or None)

    @property
    def clients_required(self) -> bool:
        return bool(self._fixed) or self.tokens_file is not None

    def client(self, presented: str) -> str | None:
        """The name of the client whose token this is, or None."""
        if self.tokens_file is not None:
            self._reload()
        wanted = digest(presented)
        found = None
        for name, known in (*self._fixed.items(), *self._from_file.items()):
            if hmac.compare_digest(wanted, known):  # every entry compared: no early exit to time
                found = name
        return found

    def admin(self, presented: str) -> bool:
        return self.admin_digest is not None and hmac.compare_digest(digest(presented), self.admin_digest)

    def _reload(self) -> None:
        try:
            stat = self.tokens_file.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"the client tokens file {self.tokens_file} ({TOKENS_FILE_ENV}) does not exist; "
                                    f"create it with: python -m mlfactory.serving.auth add --file {self.tokens_file} "
                                    "<client name>") from None
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._file_stamp:
            self._from_file = {name: entry["sha256"] for name, entry in read_tokens(self.tokens_file).items()}
            self._file_stamp = stamp


def read_tokens(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    bad = [name for name, entry in data.items() if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str))]
    if not isinstance(data, dict) or bad:
        raise ValueError(f"{path}: expected {{\"<client>\": {{\"sha256\": \"<hex>\", ...}}}}; bad entries: {bad}")
    return data


def write_tokens(path: Path, tokens: dict[str, dict]) -> None:
    """Atomically, mode 600 (the server rereads the whole file or the old one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(tokens, out, indent=2, sort_keys=True)
    os.replace(tmp, path)


def add_client(path: Path, name: str) -> str:
    """A new token for client ``name`` (replacing its old one); returns the token, stores its hash."""
    tokens = read_tokens(path)
    token = secrets.token_urlsafe(32)
    tokens[name] = {"sha256": digest(token), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_tokens(path, tokens)
    return token


def revoke_client(path: Path, name: str) -> None:
    tokens = read_tokens(path)
    if name not in tokens:
        raise KeyError(f"no client {name!r} in {path}; clients: {sorted(tokens)}")
    del tokens[name]
    write_tokens(path, tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlfactory.serving.auth", description="Manage the model server's client tokens.")
    p.add_argument("action", choices=["add", "revoke", "list"])
    p.add_argument("name", nargs="?", help="the client (add, revoke)")
    p.add_argument("--file", default=os.environ.get(TOKENS_FILE_ENV), required=TOKENS_FILE_ENV not in os.environ,
                   help=f"the tokens file (default ${TOKENS_FILE_ENV})")
    args = p.parse_intermixed_args(argv)
    path = Path(args.file)
    if args.action != "list" and not args.name:
        p.error(f"{args.action} needs the client's name")
    try:
        if args.action == "add":
            print(add_client(path, args.name))
        elif args.action == "revoke":
            revoke_client(path, args.name)
            print(f"revoked {args.name}", file=sys.stderr)
        else:
            for name, entry in sorted(read_tokens(path).items()):
                print(f"{name}\t{entry.get('created', '')}")
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
