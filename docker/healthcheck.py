"""The image's HEALTHCHECK: exit 0 when the relay's /healthz answers 200, else 1.

Reads the port from MONGO_OUTBOX_HTTP_PORT, the variable the relay itself reads, so a
container started with another port is still checked on the right one.
"""

import os
import sys
import urllib.request

port = os.environ.get("MONGO_OUTBOX_HTTP_PORT", "9464")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:  # 503 (HTTPError), refused, timed out
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
