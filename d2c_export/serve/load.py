"""The load generator: N concurrent clients over loopback HTTP, bounded in requests and in time.

Each client thread sends POST /v1/images (one image, its own class and seed) until the run's request count or
its deadline is reached; every request has a socket timeout, so a run always ends. A report counts the
answers by status, the images per second, the latency percentiles and the batch sizes the server formed (each
answer names the size of the generation it was merged into). An optional fault (`fault_at_s`, `fault`) runs
once during the run, e.g. killing a generator replica.
"""
from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable
from urllib.parse import urlsplit


@dataclass
class Sample:
    start_s: float  # from the start of the run
    latency_s: float
    status: int  # 0: no HTTP answer (connection refused or reset, timeout)
    batch_size: int = 0
    error: str = ""
    generation_s: float = 0.0  # of the generation the answer came from


@dataclass
class LoadReport:
    label: str
    clients: int
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    fault: str = ""

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def summary(self) -> dict:
        ok = self.ok
        latencies = sorted(s.latency_s for s in ok)
        failed = [s for s in self.samples if s.status != 200]
        return {"run": self.label, "clients": self.clients, "requests": len(self.samples), "ok": len(ok),
                "errors": len(failed), "statuses": dict(Counter(s.status for s in self.samples)),
                "images_per_s": len(ok) / self.seconds if self.seconds > 0 else 0.0, "seconds": self.seconds,
                "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
                "p99_s": percentile(latencies, 99),
                "batch_sizes": dict(sorted(Counter(s.batch_size for s in ok).items())),
                "error_examples": sorted({f"{s.status}: {s.error}" for s in failed})[:5], "fault": self.fault}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "samples": [asdict(s) for s in self.samples]}


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted values; NaN for none."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def post_json(url: str, path: str, body: dict, timeout_s: float, token: str | None = None
              ) -> tuple[int, dict, dict[str, str]]:
    """POST `body` as JSON; (status, the decoded JSON answer or {}, headers). Status 0: no HTTP answer."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        connection.request("POST", path, body=json.dumps(body), headers=headers)
        reply = connection.getresponse()
        raw = reply.read()
        try:
            data = json.loads(raw) if reply.getheader("content-type", "").startswith("application/json") else {}
        except ValueError:
            data = {"error": raw[:200].decode(errors="replace")}
        return reply.status, data, dict(reply.getheaders())
    finally:
        connection.close()


def default_body(index: int, classes: int, settings: dict) -> dict:
    """Request `index` of a run: class index mod classes, seed index, one image, the run's settings."""
    return {"class": index % classes, "seed": index, **settings}


def run_load(url: str, clients: int, requests: int, duration_s: float, body_for: Callable[[int], dict],
             label: str = "", timeout_s: float = 120.0, token: str | None = None, fault_at_s: float | None = None,
             fault: Callable[[], str] | None = None) -> LoadReport:
    """`clients` threads send `requests` requests in all (or until `duration_s` has passed) and wait for each."""
    lock = threading.Lock()
    issued = 0
    report = LoadReport(label=label, clients=clients, seconds=0.0)
    start = time.monotonic()

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= requests or time.monotonic() - start >= duration_s:
                    return
                index = issued
                issued += 1
            t0 = time.monotonic()
            try:
                status, data, _ = post_json(url, "/v1/images", body_for(index), timeout_s, token)
                sample = Sample(t0 - start, time.monotonic() - t0, status, int(data.get("batch_size", 0)),
                                "" if status == 200 else str(data.get("error", ""))[:200],
                                float(data.get("timings", {}).get("generation_s", 0.0)))
            except OSError as exc:  # refused, reset, or the socket timeout
                sample = Sample(t0 - start, time.monotonic() - t0, 0, 0, f"{type(exc).__name__}: {exc}"[:200])
            with lock:
                report.samples.append(sample)

    threads = [threading.Thread(target=client, name=f"load-client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    if fault is not None and fault_at_s is not None:
        time.sleep(max(0.0, fault_at_s - (time.monotonic() - start)))
        report.fault = f"at {time.monotonic() - start:.1f} s: {fault()}"
    for thread in threads:  # bounded: each request ends by its socket timeout, no new one after the deadline
        thread.join(duration_s + timeout_s + 5)
    report.seconds = time.monotonic() - start
    report.samples.sort(key=lambda s: s.start_s)
    return report


def markdown(summaries: list[dict]) -> str:
    """The runs side by side."""
    head = "| run | clients | requests | ok | errors | images/s | p50 s | p95 s | p99 s | batch sizes formed |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        sizes = ", ".join(f"{size}: {n}" for size, n in s["batch_sizes"].items()) or "-"
        lines.append(f"| {s['run']} | {s['clients']} | {s['requests']} | {s['ok']} | {s['errors']} | "
                     f"{s['images_per_s']:.2f} | {s['p50_s']:.3f} | {s['p95_s']:.3f} | {s['p99_s']:.3f} | {sizes} |")
    return "\n".join(lines)
