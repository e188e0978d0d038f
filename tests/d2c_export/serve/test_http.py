"""The HTTP API over real HTTP on a real local Ray Serve: answers, the same image however it is requested, bad
requests, back-pressure."""
from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
from PIL import Image

from d2c_export.cli import run_main
from d2c_export.manifest import MANIFEST
from reference.files import sha256_file
from tests.d2c_export.serve.conftest import CLASS_NAMES, FAST, MAX_BATCH



def concurrently(call, n: int, join_s: float) -> dict:
    """`call(k)` for k in 0..n-1 on n threads at once; the answers by k (a thread still running after `join_s`,
    or one that raised, has none)."""
    answers: dict = {}

    def run(k: int) -> None:
        answers[k] = call(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    return answers

def served_config(served):
    from d2c_export.engines import Engines
    return Engines.open(served.engines).config


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _decoded(image: dict) -> np.ndarray:
    return _pixels(base64.b64decode(image["png_base64"]))


def test_health_model_docs_and_page(served):
    status, raw, _ = served.request("GET", "/v1/health", token=None)
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, raw, _ = served.request("GET", "/v1/model")
    info = json.loads(raw)
    assert status == 200 and info["config_name"] == "d2c-tiny" and info["max_batch"] == MAX_BATCH
    assert info["classes"] == served_config(served).num_classes and info["backend"].startswith("ONNX Runtime")
    assert info["manifest_sha256"] == sha256_file(served.engines / MANIFEST)
    assert info["class_names"] == CLASS_NAMES  # the manifest's (another manifest's numbers: test_class_names.py)
    status, raw, _ = served.request("GET", "/openapi.json", token=None)
    assert status == 200 and {"/v1/images", "/v1/health", "/v1/model"} <= set(json.loads(raw)["paths"])
    status, raw, _ = served.request("GET", "/docs", token=None)
    assert status == 200 and b"swagger" in raw.lower()
    status, raw, _ = served.request("GET", "/", token=None)
    assert status == 200 and b"<select" in raw and b"/v1/images" in raw


def test_json_and_png_answers(served):
    body = served.images({"class": [1, 2], "num_images": 2, "seed": 40, **FAST})
    assert [(i["class"], i["seed"]) for i in body["images"]] == [(1, 40), (1, 41), (2, 42), (2, 43)]
    assert body["manifest_sha256"] == sha256_file(served.engines / MANIFEST) and body["precision"] == "fp32"
    assert body["settings"]["num_iter"] == 2 and body["batch_size"] >= 4 and body["timings"]["generation_s"] > 0
    assert all(len(i["tokens"]) == 16 and _decoded(i).shape == (16, 16, 3) for i in body["images"])
    status, raw, headers = served.request("POST", "/v1/images", {"class": 1, "seed": 40, "format": "png", **FAST})
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-seeds"] == "40"
    assert np.array_equal(_pixels(raw), _decoded(body["images"][0]))


def test_the_same_image_alone_batched_and_from_d2c_run(served, tmp_path, capsys):
    """(class, seed, settings) fixes the tokens and the image: alone, merged with other requests into one
    generation, as the second image of a request, and from d2c-run."""
    alone = served.images({"class": 5, "seed": 7, **FAST})
    assert alone["batch_size"] == 1
    barrier = threading.Barrier(4, timeout=30)

    def client(k: int) -> dict:
        barrier.wait()
        return served.images({"class": [5, 0, 3, 9][k], "seed": [7, 100, 3, 55][k], **FAST})

    answers = concurrently(client, 4, 60)
    assert len(answers) == 4
    batched = answers[0]
    assert batched["batch_size"] > 1 and batched["batch_requests"] > 1  # merged with the others
    second = served.images({"class": [9, 5], "seed": 6, **FAST})["images"][1]  # class 5 from seed 6 + 1
    out = tmp_path / "run.png"
    code = run_main(["--engines", served.engines, "--class", "5", "--seed", "7", "--backend", "ort", "--num-iter",
                     "2", "--diffusion-steps", "3", "--out", out, "--quiet"])
    assert code == 0, capsys.readouterr().err
    reference = _decoded(alone["images"][0])
    for other in (batched["images"][0], second):
        assert other["tokens"] == alone["images"][0]["tokens"]
        assert np.abs(_decoded(other) - reference).max() <= 1
    assert np.abs(_pixels(out.read_bytes()) - reference).max() <= 1
    assert answers[1]["images"][0]["tokens"] != alone["images"][0]["tokens"]  # and other requests differ


BAD = [  # (name, raw body or dict, status, words of the one-line error)
    ("unknown class", {"class": 10}, 422, "out of range"),
    ("negative class", {"class": [1, -1]}, 422, "out of range"),
    ("too many images", {"class": [1, 2], "num_images": 33}, 422, "limit of 64 images per request"),
    ("cfg NaN", b'{"class": 1, "cfg": NaN}', 422, "finite"),
    ("temperature inf", b'{"class": 1, "temperature": Infinity}', 422, "finite"),
    ("cfg 1e308", {"class": 1, "cfg": 1e308}, 422, "cfg"),
    ("diffusion steps 0", {"class": 1, "diffusion_steps": 0}, 422, "diffusion_steps"),
    ("diffusion steps 1001", {"class": 1, "diffusion_steps": 1001}, 422, "diffusion_steps"),
    ("more masked steps than tokens", {"class": 1, "num_iter": 17}, 422, "num_iter"),
    ("top-p above 1", {"class": 1, "top_p": 1.5}, 422, "top_p"),
    ("negative seed", {"class": 1, "seed": -1}, 422, "seed"),
    ("seed past 2^63", {"class": 1, "seed": 2 ** 63 - 1, "num_images": 2}, 422, "seed"),
    ("class as a string", {"class": "3"}, 422, "class"),
    ("class as a boolean", {"class": True}, 422, "class"),
    ("unknown field", {"class": 1, "cfg_scale": 2}, 422, "cfg_scale"),
    ("no class", {"seed": 1}, 422, "class"),
    ("not JSON", b"{class: 1", 400, "JSON"),
    ("oversized body", b'{"class": 1, "pad": "' + b"x" * 100_000 + b'"}', 413, "bytes"),
]


def _one_line_error(raw: bytes) -> str:
    assert b"\n" not in raw.strip(), raw
    body = json.loads(raw)
    assert list(body) == ["error"], body
    return body["error"]


def test_bad_requests_get_one_line_4xx_and_the_replica_stays_up(served):
    replica = served.images({"class": 1, **FAST})["replica"]
    for name, body, want, words in BAD:
        headers = {"Content-Type": "application/json"} if isinstance(body, bytes) else None
        status, raw, _ = served.request("POST", "/v1/images", body, headers=headers)
        assert status == want, (name, status, raw)
        assert words.lower() in _one_line_error(raw).lower(), (name, raw)
    for name, token, want in [("no token", None, 401), ("wrong token", "nope", 401)]:
        status, raw, headers = served.request("POST", "/v1/images", {"class": 1}, token=token)
        assert status == want and "bearer" in _one_line_error(raw).lower(), name
        assert headers.get("www-authenticate") == "Bearer"
    assert served.request("GET", "/v1/images")[0] == 405 and served.request("GET", "/v2/none")[0] == 404
    after = served.images({"class": 1, **FAST})
    assert after["replica"] == replica  # the same replica answered: none crashed


def test_a_full_queue_answers_503_with_retry_after(served):
    """More requests than the replica holds (2 x max batch) plus the queue (4) are refused at once."""
    slow = {"class": 1, "num_iter": 16, "diffusion_steps": 1000}
    answers = concurrently(lambda k: served.request("POST", "/v1/images", {**slow, "seed": k}, timeout_s=90), 28, 120)
    results = list(answers.values())
    assert len(results) == 28
    statuses = sorted(status for status, _, _ in results)
    refused = [(raw, headers) for status, raw, headers in results if status == 503]
    assert set(statuses) == {200, 503} and len(refused) >= 4, statuses
    odd = [(raw, headers.get("retry-after")) for raw, headers in refused
           if headers.get("retry-after") != "1" or "queue" not in _one_line_error(raw)]
    assert not odd, odd

