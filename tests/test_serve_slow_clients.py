"""Slow and half-sent requests do not lock anyone out of ``llara serve``, and the server closes them.

A real server process, a second process holding the slow connections (tests/_slow_clients.py),
and normal requests from this one, all on loopback. Latency is compared with a baseline measured
in the same test, by a generous factor: no absolute timings."""
from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_index import index_setup, start_server

httpx = pytest.importorskip("httpx", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")


HOLDER = Path(__file__).with_name("_slow_clients.py")
HELD = 300  # over uvicorn's old limit_concurrency of 256 that idle sockets used to fill
SAMPLES = 40
FACTOR = 5  # median latency with the slow clients held vs. without them


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return index_setup(tmp_path_factory.mktemp("slow"), 30, 16)["ref"]


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1]


def _start_holder(url: str, n: int, kinds: str, hold: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, str(HOLDER), "--port", _port(url), "-n", str(n), "--kinds", kinds,
                               "--hold", str(hold)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline()  # "ready N" once every connection is open
    assert line.strip() == f"ready {n}", line
    return holder


def _finish_holder(holder: subprocess.Popen, release: bool) -> dict:
    """The holder's report: at once (``release``), or once the server closed every connection
    (stdin stays open meanwhile: its end would release them; ``--hold`` bounds the wait)."""
    if release:
        out, _ = holder.communicate("release\n", timeout=120)
    else:
        out = holder.stdout.read()
        holder.communicate(timeout=30)
    assert holder.returncode == 0
    return json.loads(out)


def _latencies(url: str) -> tuple[list[float], list[int]]:
    """Half the requests on one keep-alive connection, half on a new connection each."""
    times, statuses = [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(SAMPLES):
            body = {"query": f"fish in the river {i}", "k": 5}
            t = time.perf_counter()
            r = client.post("/search", json=body) if i % 2 else httpx.post(f"{url}/search", json=body, timeout=30)
            times.append(time.perf_counter() - t)
            statuses.append(r.status_code)
    return times, statuses


def test_held_half_sent_requests_do_not_lock_out_or_slow_down(index_dir, tmp_path):
    # long deadlines, so that every slow connection is still held while we measure
    server, url = start_server(index_dir, tmp_path / "server.log", "--head-timeout", "600", "--body-timeout", "600")
    try:
        _latencies(url)  # warm-up
        before, st0 = _latencies(url)
        holder = _start_holder(url, HELD, "silent,head,body", hold=240)
        try:
            held, st1 = _latencies(url)
        finally:
            report = _finish_holder(holder, release=True)
        after, st2 = _latencies(url)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert st0 == st1 == st2 == [200] * SAMPLES, (st1, (tmp_path / "server.log").read_text()[-2000:])
    # all 300 were still open when released: they were held during the measurement
    assert sum(r["opened"] for r in report.values()) == HELD, report
    assert all(r["closed_by_server"] == 0 for r in report.values()), report
    base = max(statistics.median(before), statistics.median(after))
    print(f"median latency: {statistics.median(before) * 1000:.1f} ms before, {statistics.median(held) * 1000:.1f} "
          f"ms with {HELD} slow connections held, {statistics.median(after) * 1000:.1f} ms after")
    assert statistics.median(held) <= FACTOR * base, (statistics.median(held), base)


def test_server_closes_slow_connections_at_its_deadlines(index_dir, tmp_path):
    server, url = start_server(index_dir, tmp_path / "server.log", "--head-timeout", "1.5", "--body-timeout", "1.5",
                                "--keep-alive", "1")
    try:
        holder = _start_holder(url, 25, "silent,head,body,trickle,keepalive", hold=90)
        report = _finish_holder(holder, release=False)  # returns once the server has closed every one
        assert httpx.post(f"{url}/search", json={"query": "fish"}, timeout=30).status_code == 200
        with socket.create_connection(("127.0.0.1", int(_port(url))), timeout=30) as s:
            s.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn's own 400, with the service's error body
            malformed = b""
            while chunk := s.recv(65536):  # the server closes after its 400
                malformed += chunk
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert {k: r["closed_by_server"] for k, r in report.items()} == \
        {k: 5 for k in ("silent", "head", "body", "trickle", "keepalive")}, report
    assert report["body"]["statuses"] == {"408": 5}, report  # a body shorter than its Content-Length
    assert report["keepalive"]["statuses"] == {"200": 5}, report  # answered, then closed when idle
    assert report["trickle"]["statuses"] == {} and report["silent"]["statuses"] == {}, report
    head, _, body = malformed.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), malformed
    assert set(json.loads(body)) == {"error"}
