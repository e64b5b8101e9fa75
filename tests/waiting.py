"""Polling helper for tests that wait on a real worker."""

from __future__ import annotations

import json
import time


def wait_for(fetch, done, timeout=180, every=0.5):
    """Call fetch() every `every` seconds until done(value) holds; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last value: {json.dumps(value, default=str)[:2000]}")
        time.sleep(every)
