"""``switchboard explain request ID``: why a recent request was routed where it was.

Fetches ``GET /debug/requests/{ID}`` from a gateway (``--gateway``, env
``SWITCHBOARD_GATEWAY``, default http://127.0.0.1:8000) with the tenant's API key
(``--api-key``, env ``SWITCHBOARD_API_KEY``, else ``.switchboard/demo-api-key`` that
``make up`` writes) and prints the explanation (``-o json``: the whole body). ID is the
request id (``X-Request-Id``) or the response's ``id`` (``cmpl-...`` / ``chatcmpl-...``).
A gateway keeps the last few thousand requests it routed; ask the replica that served it.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
DEMO_KEY_FILE = Path(".switchboard/demo-api-key")


def add_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--gateway",
        default=os.environ.get("SWITCHBOARD_GATEWAY", DEFAULT_GATEWAY),
        help="explain request: the gateway's base URL (env SWITCHBOARD_GATEWAY)",
    )
    sp.add_argument(
        "--api-key",
        default=os.environ.get("SWITCHBOARD_API_KEY", ""),
        help="explain request: the tenant's API key (env SWITCHBOARD_API_KEY; default "
        ".switchboard/demo-api-key)",
    )
    sp.add_argument(
        "-o", "--output", choices=["text", "json"], default="text", help="explain request"
    )


def fetch(gateway: str, request_id: str, api_key: str, timeout_s: float) -> dict[str, Any]:
    """The gateway's record of ``request_id``; SystemExit with its error message if none."""
    url = f"{gateway.rstrip('/')}/debug/requests/{urllib.parse.quote(request_id, safe='')}"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout_s
        ) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise SystemExit(f"error: {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"error: cannot reach the gateway at {gateway}: {e}") from None


def cmd_explain_request(args: argparse.Namespace) -> None:
    api_key = args.api_key
    if not api_key and DEMO_KEY_FILE.is_file():
        api_key = DEMO_KEY_FILE.read_text().strip()
    body = fetch(args.gateway, args.name, api_key, args.timeout)
    if args.output == "json":
        print(json.dumps(body, indent=2))
    else:
        print(body.get("explanation", ""))
