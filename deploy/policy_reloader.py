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

- ``POLICY_FILE``: the file to watch (default ``/etc/guardrail/policies/policy.yaml``)
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


def digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


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
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def main(argv: list[str]) -> int:
    path = Path(os.environ.get("POLICY_FILE", "/etc/guardrail/policies/policy.yaml"))
    gateway = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080")
    admin_key = os.environ.get("GUARDRAIL_ADMIN_KEY", "")
    interval = float(os.environ.get("INTERVAL_S", "10"))
    if "--once" in argv:
        status, body = reload(gateway, admin_key)
        log("reload", status=status, body=body[:500])
        return 0 if status == 200 else 1
    # The gateway loaded the file as it was at startup: only later changes are posted.
    seen = digest(path)
    log("watching", file=str(path), sha256=seen, gateway=gateway, interval_s=interval)
    pending: str | None = None  # a change not yet acknowledged by the gateway
    while True:
        time.sleep(interval)
        current = digest(path)
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
