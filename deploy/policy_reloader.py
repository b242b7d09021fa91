"""Reload the gateway's policy when its file changes: the sidecar of deploy/k8s.

Kubernetes updates a ConfigMap mounted as a volume in place (an atomic symlink swap,
within about a minute of ``kubectl apply``), but the gateway reads its policy only at
startup, on SIGHUP and on ``POST /admin/reload``. This script, run beside the gateway
in the same pod (the gateway image has Python; no other image is needed), polls the
file's sha256 and, when it changes, posts ``/admin/reload`` to the gateway on
localhost with the admin key. A bad policy answers 422: the gateway keeps the running
policy and counts ``guardrail_policy_reloads_total{result="error"}`` (an alert fires);
the reloader logs the answer and waits for the next change. Standard library only.

Environment:

- ``POLICY_FILE``: what to watch (default ``/etc/guardrail/policies/policy.yaml``): a
  file, or a folder, meaning every ``*.yaml`` and ``*.yml`` in it (the default policy
  and the tenant and shadow policies of one ConfigMap), or several of these separated by
  ``:``. A change to any of them posts one reload, which reloads every policy.
- ``GATEWAY_URL``: the gateway (default ``http://127.0.0.1:8080``)
- ``GUARDRAIL_ADMIN_KEY``: sent as ``Authorization: Bearer <key>`` when set
- ``INTERVAL_S``: seconds between polls (default 10)

Run ``python policy_reloader.py --once`` to check the file once and post a reload.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def log(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "logger": "policy_reloader", **fields}), flush=True)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def digest(paths: list[Path]) -> str | None:
    """One sha256 over the watched files' names and bytes; None if one cannot be read."""
    h = hashlib.sha256()
    try:
        for path in paths:
            for file in _files(path):
                h.update(str(file).encode() + b"\0" + file.read_bytes() + b"\0")
    except OSError:
        return None
    return h.hexdigest()


def reload(gateway: str, admin_key: str, timeout_s: float = 30.0) -> tuple[int, str]:
    """POST /admin/reload; returns (HTTP status, body), status 0 if nothing answered."""
    request = urllib.request.Request(f"{gateway.rstrip('/')}/admin/reload", data=b"", method="POST")
    if admin_key:
        request.add_header("Authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as e:
        # ValueError: a key no header can hold. Tried again next poll, not a crash.
        return 0, f"{type(e).__name__}: {e}"


def main(argv: list[str]) -> int:
    watched = os.environ.get("POLICY_FILE", "/etc/guardrail/policies/policy.yaml")
    paths = [Path(p) for p in watched.split(":") if p]
    gateway = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080")
    # Stripped as the gateway strips it: a Secret made from a file ends in a line break,
    # which no header may hold (the sidecar died on it, and the change was never posted).
    admin_key = os.environ.get("GUARDRAIL_ADMIN_KEY", "").strip()
    interval = float(os.environ.get("INTERVAL_S", "10"))
    if "--once" in argv:
        status, body = reload(gateway, admin_key)
        log("reload", status=status, body=body[:500])
        return 0 if status == 200 else 1
    # The gateway loaded the file as it was at startup: only later changes are posted.
    seen = digest(paths)
    log("watching", file=watched, sha256=seen, gateway=gateway, interval_s=interval)
    pending: str | None = None  # a change not yet acknowledged by the gateway
    while True:
        time.sleep(interval)
        current = digest(paths)
        if current is None or (current == seen and pending is None):
            continue
        status, body = reload(gateway, admin_key)
        log("reload", sha256=current, status=status, body=body[:500])
        if status == 0 or status >= 500:
            pending = current  # the gateway did not answer: try again next poll
            continue
        # 200 (reloaded) or 4xx (a bad policy, or a wrong key): not retried until
        # the file changes again.
        seen, pending = current, None


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(0)
