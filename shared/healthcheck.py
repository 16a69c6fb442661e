"""``python -m shared.healthcheck``: exit 0 when this container's service answers /health.

Used by the image's HEALTHCHECK and by docker-compose.yml. The port comes from ``PORT`` (set
by the image per service; the worker's is WORKER_METRICS_PORT).
"""

from __future__ import annotations

import os
import sys
import urllib.request

DEFAULT_PORTS = {"user_service": 8000, "campaign_service": 8001, "gateway": 8082, "worker": 9000}


def main() -> int:
    service = os.environ.get("SERVICE", "")
    port = os.environ.get("PORT") or os.environ.get("WORKER_METRICS_PORT")
    port = port or str(DEFAULT_PORTS.get(service, 8000))
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
