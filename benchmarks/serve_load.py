"""Load test of `vitkit serve` on loopback: N concurrent clients, with and without dynamic batching.

For each --max-batch setting a fresh server process is started on a free 127.0.0.1 port; N client threads, each
on its own keep-alive connection, post the same JPEG for --seconds (or until --requests in all), and the
requests/s, p50/p99 latency, errors and the server's mean batch size are printed. Bounded in time and requests,
and it talks to loopback only.

    .venv/bin/python benchmarks/serve_load.py                        # ViT-Ti/16 at 224, 16 clients, batch 8 vs 1
    .venv/bin/python benchmarks/serve_load.py --model runs/c10/model --clients 32 --seconds 30 --max-batch 16 1
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vitkit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def start_server(model: Path, port: int, max_batch: int, max_wait_ms: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "vitkit", "-q", "serve", str(model), "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            get_json(port, "/health")
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start in 180 s")


def load(port: int, body: bytes, clients: int, seconds: float, max_requests: int) -> tuple[list[float], int, float]:
    """Latencies (s) of the answered requests, the error count, and the wall time."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    sent = 0
    stop_at = time.monotonic() + seconds

    def client() -> None:
        nonlocal errors, sent
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Content-Type": "image/jpeg"}
        while time.monotonic() < stop_at:
            with lock:
                if sent >= max_requests:
                    break
                sent += 1
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint to serve (default: a fresh ViT-Ti/16 at 224, 1000 classes)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="per setting")
    parser.add_argument("--requests", type=int, default=5000, help="most requests per setting")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[8, 1], help="settings to compare (1: off)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    body = buffer.getvalue()  # a 500x375 photo-sized JPEG
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            torch.manual_seed(0)
            model = vitkit.save_pretrained(vitkit.create_model("vit_ti16"), Path(tmp) / "vit_ti16")
        print(f"model {model}; {args.clients} clients; {args.seconds:.0f} s or {args.requests} requests per setting")
        print(f"upload: {len(body)} bytes JPEG, 500x375; torch {torch.__version__}, {torch.get_num_threads()} threads")
        header = ("max-batch", "requests", "req/s", "p50 ms", "p99 ms", "errors", "mean batch")
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, (9, 8, 7, 8, 8, 6, 10), strict=True)))
        for max_batch in args.max_batch:
            port = free_port()
            server = start_server(Path(model), port, max_batch, args.max_wait_ms)
            try:
                load(port, body, args.clients, 2.0, args.clients * 2)  # warm-up, not counted
                before = get_json(port, "/health")
                latencies, errors, wall = load(port, body, args.clients, args.seconds, args.requests)
                after = get_json(port, "/health")
            finally:
                server.terminate()
                server.wait(30)
            served = after["requests"] - before["requests"]
            mean_batch = served / max(after["batches"] - before["batches"], 1)
            ms = np.array(latencies) * 1000
            p50, p99 = (np.percentile(ms, 50), np.percentile(ms, 99)) if len(ms) else (float("nan"),) * 2
            print(
                f"{max_batch:>9} {len(latencies):>8} {len(latencies) / wall:>7.1f} {p50:>8.0f} {p99:>8.0f} "
                f"{errors:>6} {mean_batch:>10.2f}"
            )


if __name__ == "__main__":
    main()
