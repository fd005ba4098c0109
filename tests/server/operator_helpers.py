"""Helpers for the operator tests: a real uvicorn server in a thread of the test process (so
a test can reach into its app: hold its round lock, read its puller), and Prometheus text
parsed with prometheus_client's own parser."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from crdt_merge_server.app import create_app
from crdt_merge_server.main import bind
from crdt_merge_server.settings import Settings


class ThreadServer:
    """``create_app(replica_dir, settings)`` served by uvicorn on 127.0.0.1 (a free port) in a
    thread; ``stop()`` ends it (and the app's threads) through the app's lifespan."""

    def __init__(self, replica_dir: Any, settings: Settings | None = None) -> None:
        self.app = create_app(replica_dir, settings or Settings())
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                lifespan="on", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)

    @property
    def service(self) -> Any:
        return self.app.state.service

    @property
    def puller(self) -> Any:
        return self.app.state.puller

    @property
    def notifier(self) -> Any:
        return self.app.state.notifier

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def scrape(url: str, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                       float]:
    """``GET /metrics``, parsed: ``{(sample name, sorted labels): value}``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled counter not moved yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))
