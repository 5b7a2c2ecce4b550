"""The prediction service through real HTTP against a real `vitkit serve` process, and its batcher alone."""

import io
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from randomized import randomized
from serving import call, multipart, running_server

import vitkit
from vitkit.analysis import attention_rollout
from vitkit.cli import main
from vitkit.data.images import decode
from vitkit.evaluate import inference_model

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
from vitkit.serve.app import Job, create_app, run_jobs
from vitkit.serve.batching import DynamicBatcher

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
MAX_UPLOAD = 64 * 1024  # bytes
MAX_PIXELS = 1_000_000


def image_bytes(fmt: str, size=(40, 50), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = vitkit.ViTConfig(img_size=(32, 32), patch_size=8, width=32, depth=2, heads=4, mlp_dim=64, num_classes=7)
    model = randomized(cfg, seed=4)
    model.classes = CLASSES
    vitkit.save_pretrained(model, root / "model")
    args = ["--max-batch", "8", "--max-wait-ms", "20", "--max-upload-mb", str(MAX_UPLOAD / 2**20)]
    with running_server(root / "model", root / "server.log", *args, "--max-pixels", str(MAX_PIXELS)) as url:
        yield SimpleNamespace(url=url, root=root, model=model)


def test_health_and_model(service):
    url, model = service.url, service.model
    status, health = call(url + "/health")
    assert status == 200 and health["status"] == "ok" and health["max_batch"] == 8
    assert {"requests", "batches", "largest_batch", "queued"} <= set(health)
    status, info = call(url + "/model")
    assert status == 200
    assert info["name"] == str(service.root / "model")  # MODEL as given, without --name
    assert info["classes"] == CLASSES and info["num_classes"] == 7
    assert info["img_size"] == [32, 32] and info["preprocess"] == model.preprocess.to_dict()
    assert info["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS}
    assert info["precision"] == "fp32" and info["flip"] is False
    with urllib.request.urlopen(url + "/", timeout=30) as page:
        html = page.read().decode()
    assert page.status == 200 and 'id="bars"' in html and "predict?topk=5&attention=1" in html


def test_predictions_equal_vitkit_predict(service, capsys):
    url, root = service.url, service.root
    files = {"a.png": image_bytes("PNG"), "b.jpg": image_bytes("JPEG", (60, 45), seed=1)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    assert main(["predict", str(root / "model"), *(str(root / n) for n in files), "--format", "json"]) == 0
    expected = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(capsys.readouterr().out)}
    body, headers = multipart("image", "a.png", files["a.png"], "image/png")  # a browser form upload
    answers = {"a.png": call(url + "/predict", body, headers), "b.jpg": call(url + "/predict", files["b.jpg"])}
    for name, (status, answer) in answers.items():
        assert status == 200, answer
        assert answer["labels"] == expected[name]["labels"] and len(answer["labels"]) == 5
        np.testing.assert_allclose(answer["probs"], expected[name]["probs"], atol=1e-5, rtol=0)
        assert "attention" not in answer
    status, answer = call(url + "/predict?topk=2", files["b.jpg"])
    assert status == 200 and answer["labels"] == expected["b.jpg"]["labels"][:2]


def test_attention_rollout_on_request(service):
    url, model = service.url, service.model
    data = image_bytes("PNG", (48, 30), seed=2)
    status, answer = call(url + "/predict?attention=1", data)
    assert status == 200
    attention = answer["attention"]
    assert attention["grid"] == [4, 4] and attention["region"] == [0.0, 0.0, 1.0, 1.0]  # "squash": whole image
    x = model.preprocess(decode(data, "test"))[None]
    np.testing.assert_allclose(np.array(attention["map"]), attention_rollout(model, x)[0], atol=1e-6, rtol=0)


def test_bad_requests_get_clear_errors_and_the_service_keeps_serving(service):
    url = service.url
    status, answer = call(url + "/predict", b"<html>an error page saved as .jpg</html>")
    assert status == 415 and "not a readable image" in answer["error"] and "HTML" in answer["error"]
    status, answer = call(url + "/predict", image_bytes("PNG")[:200])  # truncated
    assert status == 415 and answer["status"] == 415
    status, answer = call(url + "/predict", b"", {"Content-Type": "application/octet-stream"})
    assert status == 400 and "empty upload" in answer["error"]
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nabc\r\n'
    two_files = part + part.replace(b'"image"', b'"other"') + b"--b--\r\n"
    status, answer = call(url + "/predict", two_files, {"Content-Type": "multipart/form-data; boundary=b"})
    assert status == 400 and "Too many files" in answer["error"]  # starlette's own error, as JSON
    body, headers = multipart("image", "a.bin", b"x" * (MAX_UPLOAD + 1), "application/octet-stream")
    status, answer = call(url + "/predict", body, headers)
    assert status == 413 and f"over the limit of {MAX_UPLOAD} bytes" in answer["error"]
    chunked = iter([b"\0" * 16384] * 8)  # no Content-Length: counted while it arrives
    status, answer = call(url + "/predict", chunked)  # urllib sends an iterable chunked
    assert status == 413 and f"over the limit of {MAX_UPLOAD} bytes" in answer["error"]
    buffer = io.BytesIO()
    Image.new("L", (2000, 1000)).save(buffer, "PNG")  # 2 megapixels in a few kB
    status, answer = call(url + "/predict", buffer.getvalue())
    assert status == 413 and "2000x1000 = 2000000 pixels is over the limit of 1000000" in answer["error"]
    status, answer = call(url + "/predict?topk=many", image_bytes("PNG"))
    assert status == 400 and "expected an integer from 1 to 7" in answer["error"]
    status, answer = call(url + "/predict", method="GET")
    assert status == 405 and answer["status"] == 405
    # Still serving, and the worker never saw the bad requests.
    status, answer = call(url + "/predict", image_bytes("PNG"))
    assert status == 200 and len(answer["labels"]) == 5
    status, health = call(url + "/health")
    assert health["status"] == "ok" and health["failed_batches"] == 0


def test_concurrent_requests_are_batched(service):
    url = service.url
    data = image_bytes("PNG", seed=3)
    _, before = call(url + "/health")
    _, single = call(url + "/predict", data)
    n = 16
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda _: call(url + "/predict", data), range(n)))
    _, after = call(url + "/health")
    for status, answer in answers:
        assert status == 200 and answer["labels"] == single["labels"]
        np.testing.assert_allclose(answer["probs"], single["probs"], atol=1e-6, rtol=0)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == n + 1
    assert batches < requests and after["largest_batch"] > 1


def test_bf16_answers_are_close_to_fp32_and_rollouts_stay_fp32(service):
    model = service.model
    images = torch.stack([model.preprocess(decode(image_bytes("PNG", seed=i), "x", 3)) for i in range(3)])
    jobs = [Job(image, attention=True) for image in images]
    fp32, bf16 = run_jobs(model, model, jobs), run_jobs(model, model, jobs, "bf16")
    for a, b in zip(fp32, bf16, strict=True):
        np.testing.assert_allclose(b.probs, a.probs, atol=0.02, rtol=0)  # bf16 rounds: close, and not equal
        np.testing.assert_array_equal(b.rollout, a.rollout)
    assert any(not torch.equal(a.probs, b.probs) for a, b in zip(fp32, bf16, strict=True))
    with pytest.raises(ValueError, match="precision fp16 needs a CUDA device"):
        create_app(model, precision="fp16")


def test_int8_answers_are_close_to_fp32_and_rollouts_stay_fp32(service):
    model = service.model
    images = torch.stack([model.preprocess(decode(image_bytes("PNG", seed=i), "x", 3)) for i in range(3)])
    jobs = [Job(image, attention=True) for image in images]
    int8 = inference_model(model, "cpu", "int8")
    fp32, quantized = run_jobs(model, model, jobs), run_jobs(model, int8, jobs, "int8")
    for a, b in zip(fp32, quantized, strict=True):
        np.testing.assert_allclose(b.probs, a.probs, atol=0.03, rtol=0)
        np.testing.assert_array_equal(b.rollout, a.rollout)  # the rollout runs the fp32 model
    assert any(not torch.equal(a.probs, b.probs) for a, b in zip(fp32, quantized, strict=True))


def test_flip_answers_average_the_mirror_images(service):
    model = service.model
    images = torch.stack([model.preprocess(decode(image_bytes("PNG", seed=i), "x", 3)) for i in range(3)])
    flipped = run_jobs(model, model, [Job(image, attention=False) for image in images], flip=True)
    plain = run_jobs(model, model, [Job(image, attention=False) for image in images])
    mirrored = run_jobs(model, model, [Job(image.flip(-1), attention=False) for image in images])
    for f, a, b in zip(flipped, plain, mirrored, strict=True):
        np.testing.assert_allclose(f.probs, (a.probs + b.probs) / 2, atol=1e-6, rtol=0)
        assert not torch.allclose(f.probs, a.probs, atol=1e-4)


def test_batcher_batches_and_survives_a_failing_batch():
    def run(items):
        if "boom" in items:
            raise ValueError("boom in the batch")
        time.sleep(0.02)  # a model call: others arrive meanwhile
        return [item.upper() for item in items]

    batcher = DynamicBatcher(run, max_batch=4, max_wait_ms=10)
    batcher.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            futures = list(pool.map(batcher.submit, [f"x{i}" for i in range(12)]))
        assert [f.result(10) for f in futures] == [f"X{i}" for i in range(12)]
        assert batcher.stats.requests == 12 and batcher.stats.batches < 12 and batcher.stats.largest_batch <= 4
        failing = batcher.submit("boom")
        with pytest.raises(ValueError, match="boom in the batch"):
            failing.result(10)
        assert batcher.submit("after").result(10) == "AFTER" and batcher.alive
        assert batcher.stats.failed_batches == 1
    finally:
        batcher.stop()
    assert not batcher.alive


def test_batcher_without_batching_runs_one_at_a_time():
    sizes = []
    lock = threading.Lock()

    def run(items):
        with lock:
            sizes.append(len(items))
        return [torch.tensor(float(i)) for i in items]

    batcher = DynamicBatcher(run, max_batch=1, max_wait_ms=50)
    batcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = list(pool.map(batcher.submit, range(8)))
        assert [float(f.result(10)) for f in futures] == [float(i) for i in range(8)]
    finally:
        batcher.stop()
    assert sizes == [1] * 8 and batcher.stats.batches == 8
