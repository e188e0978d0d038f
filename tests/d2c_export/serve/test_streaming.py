"""Streaming, cancellation and splitting over real HTTP on the session's Ray Serve: progress events end with the
images; a client that leaves has its work dropped, and a neighbour that leaves changes no other image; a request
over the max batch is split across generations."""
from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.d2c_export.serve.conftest import FAST, MAX_BATCH
from tests.d2c_export.serve.test_http import concurrently

SLOW = {"num_iter": 8, "diffusion_steps": 500}  # long enough (a second or more) for progress to be seen
LONG = {"num_iter": 16, "diffusion_steps": 1000}  # long enough to be left in the middle
NDJSON = {"Accept": "application/x-ndjson"}


class Stream:
    """A streaming POST /v1/images whose events are read one line at a time; `close` leaves mid-stream."""

    def __init__(self, served, body: dict, timeout_s: float = 60):
        parts = urlsplit(served.url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        self.connection.request("POST", "/v1/images", body=json.dumps(body),
                                headers={"Content-Type": "application/json", "Authorization": f"Bearer {served.token}",
                                         **NDJSON})
        self.reply = self.connection.getresponse()

    def events(self):
        for line in self.reply:
            if line.strip():
                yield json.loads(line)

    def close(self) -> None:
        self.reply.close()  # as a client that leaves: the socket closes under the answer
        self.connection.close()


def _health(served) -> dict:
    status, raw, _ = served.request("GET", "/v1/health", token=None)
    assert status == 200, raw
    return json.loads(raw)


def test_the_streaming_form_reports_progress_and_ends_with_the_images(served):
    body = {"class": 3, "seed": 11, **SLOW}
    stream = Stream(served, body)
    assert stream.reply.status == 200 and stream.reply.getheader("content-type").startswith("application/x-ndjson")
    events = list(stream.events())
    stream.close()
    progress, last = events[:-1], events[-1]
    assert progress and all(e["event"] == "progress" for e in progress), events[-3:]
    assert {e["stage"] for e in progress} <= {"discrete", "masked", "decode"}
    assert all(e["parts"] == 1 and e["part"] == 1 and e["steps"] >= e["step"] >= 0 for e in progress)
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and 0 < fractions[-1] <= 1
    assert any(e["stage"] == "masked" and e["steps"] == SLOW["num_iter"] for e in progress)
    assert last["event"] == "images" and [(i["class"], i["seed"]) for i in last["images"]] == [(3, 11)]
    plain = served.images(body)["images"][0]  # the same request without streaming: the same image
    assert base64.b64decode(last["images"][0]["png_base64"]) == base64.b64decode(plain["png_base64"])
    assert last["images"][0]["tokens"] == plain["tokens"]


def test_the_streaming_form_answers_a_bad_request_as_the_plain_form_does(served):
    status, raw, _ = served.request("POST", "/v1/images", {"class": 99, **FAST}, headers=NDJSON)
    assert status == 422 and "out of range" in json.loads(raw)["error"]
    status, raw, _ = served.request("POST", "/v1/images", {"class": 1, "format": "png", **FAST}, headers=NDJSON)
    assert status == 422 and "does not stream" in json.loads(raw)["error"]


def _wait_for(served, what: str, value: int, timeout_s: float = 60) -> int:
    """Poll the replica's health (bounded) until `what` reaches `value`; its last value."""
    deadline = time.monotonic() + timeout_s
    while (now := _health(served)[what]) != value and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "plain"])
def test_a_client_that_leaves_has_its_generation_dropped(served, stream):
    before = _health(served)["dropped_jobs"]
    if stream:
        client = Stream(served, {"class": 2, "seed": 5, **LONG})
        assert next(client.events())["event"] == "progress"
    else:  # no event to wait for: the replica's health says when its generation runs
        parts = urlsplit(served.url)
        client = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        client.request("POST", "/v1/images", body=json.dumps({"class": 2, "seed": 5, **LONG}),
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {served.token}"})
        assert _wait_for(served, "running_jobs", 1) == 1
    client.close()  # the client leaves: the replica stops the generation at its next step
    assert _wait_for(served, "dropped_jobs", before + 1) == before + 1
    assert _wait_for(served, "running_jobs", 0) == 0
    assert served.images({"class": 2, "seed": 5, **FAST})["batch_size"] == 1  # the replica serves on


def _pair(served, leave: bool) -> dict:
    """A plain request and a streaming neighbour sent together (merged into one generation); the neighbour leaves
    after its first progress event when `leave`. The plain request's answer."""
    barrier = threading.Barrier(2, timeout=30)
    left = threading.Event()

    def client(k: int):
        barrier.wait()
        if k == 0:
            time.sleep(0.05)  # after the neighbour, inside the batch wait (0.25 s)
            return served.images({"class": 4, "seed": 21, **SLOW}, timeout_s=90)
        stream = Stream(served, {"class": 6, "seed": 300, **SLOW}, timeout_s=90)
        events = stream.events()
        if leave:
            next(events)
            stream.close()
            left.set()
            return None
        return list(events)[-1]

    answers = concurrently(client, 2, 120)
    assert 0 in answers and (left.is_set() or not leave)
    return answers[0]


def test_a_neighbour_that_leaves_changes_no_other_image(served):
    before = _health(served)["dropped_jobs"]
    with_leaver = _pair(served, leave=True)
    assert _health(served)["dropped_jobs"] == before + 1  # its rows left the generation (or it was left out)
    with_stayer = _pair(served, leave=False)
    assert with_leaver["batch_size"] == with_stayer["batch_size"] == 2  # merged with the neighbour both times
    mine, again = with_leaver["images"][0], with_stayer["images"][0]
    assert base64.b64decode(mine["png_base64"]) == base64.b64decode(again["png_base64"])  # bit for bit
    assert mine["tokens"] == again["tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_a_request_over_the_max_batch_is_split_across_generations(served, stream):
    classes, per_class = [1, 7, 2], 3  # 9 images: parts of 4, 4 and 1
    body = {"class": classes, "num_images": per_class, "seed": 60, **FAST}
    if stream:
        events = list(Stream(served, body).events())
        answer = events[-1]
        assert answer["event"] == "images"
        assert {e["parts"] for e in events[:-1]} <= {3}
    else:
        answer = served.images(body)
    assert [(i["class"], i["seed"]) for i in answer["images"]] == \
        [(c, 60 + k) for k, c in enumerate(c for c in classes for _ in range(per_class))]
    assert answer["batch_size"] <= MAX_BATCH
    eighth = served.images({"class": 2, "seed": 67, **FAST})["images"][0]  # image 7 of the split request, alone
    assert answer["images"][7]["tokens"] == eighth["tokens"]
