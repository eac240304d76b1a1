"""Submit a study and wait for it: the client of ``bench/scheduler.py``, run as a child process
(as a user's CLI is) so that its HTTP work does not share the server's interpreter lock.

    python bench/study_client.py URL TRIALS < spec.json     # prints the server's wall time
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

import httpx


def submit_and_wait(client: httpx.Client, spec: dict[str, Any], trials: int) -> float:
    study_id = client.post("/api/v1/studies", json=spec).json()["id"]
    while True:
        # Slow polling on purpose: the wall time comes from the server's own timestamps
        # (stored -> completed), so the client's polling neither adds to it nor loads it.
        status = client.get(f"/api/v1/studies/{study_id}").json()
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.25)
    assert status["counts"] == {"complete": trials}, status
    created = datetime.fromisoformat(status["created_at"])
    finished = datetime.fromisoformat(status["finished_at"])
    return (finished - created).total_seconds()


if __name__ == "__main__":
    with httpx.Client(base_url=sys.argv[1], timeout=30) as client:
        print(submit_and_wait(client, json.loads(sys.stdin.read()), int(sys.argv[2])))
