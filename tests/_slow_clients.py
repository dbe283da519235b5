"""Hold many slow or half-sent requests open against a server; run as its own process by
test_serve_slow_clients.py (loopback only, bounded in time).

    python tests/_slow_clients.py --port PORT -n 300 --kinds silent,head,body --hold 120

Opens ``-n`` connections to 127.0.0.1:PORT, the kinds taken in turn:

* ``silent``: connects and sends nothing;
* ``head``: sends half of a request head and stops;
* ``body``: sends a complete POST /search head declaring Content-Length: 200, then 20 bytes;
* ``trickle``: sends a request head one byte every 0.3 s (a slowloris);
* ``keepalive``: sends a full GET /health, reads the answer, then stays idle.

Prints ``ready N`` once all are open, then waits until a line arrives on stdin, every connection
has been closed by the server, or ``--hold`` seconds pass; then prints one JSON object: for each
kind, how many connections the server closed, after how many seconds (max), and the status lines
it answered them with.
"""
from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time

HEAD = b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
BODY_HEAD = HEAD + b"Content-Length: 200\r\n\r\n"
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=300)
    p.add_argument("--kinds", default="silent,head,body")
    p.add_argument("--hold", type=float, default=60.0)
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    sel = selectors.DefaultSelector()
    conns = []  # [kind, socket, bytes sent of a trickle, closed at, answer]
    for i in range(args.n):
        kind = kinds[i % len(kinds)]
        s = socket.create_connection(("127.0.0.1", args.port), timeout=30)
        if kind == "head":
            s.sendall(HEAD[: len(HEAD) // 2])
        elif kind == "body":
            s.sendall(BODY_HEAD + b'{"query": "fish", "k')
        elif kind == "keepalive":
            s.sendall(HEALTH)
        s.setblocking(False)
        c = {"kind": kind, "sock": s, "sent": 0, "closed": None, "answer": b""}
        conns.append(c)
        sel.register(s, selectors.EVENT_READ, c)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    print(f"ready {len(conns)}", flush=True)
    t0 = time.monotonic()
    next_trickle = t0
    open_count = len(conns)
    while open_count and time.monotonic() - t0 < args.hold:
        now = time.monotonic()
        if now >= next_trickle:
            for c in conns:
                if c["kind"] == "trickle" and c["closed"] is None and c["sent"] < len(HEAD):
                    try:
                        c["sock"].send(HEAD[c["sent"] : c["sent"] + 1])
                        c["sent"] += 1
                    except OSError:
                        pass
            next_trickle = now + 0.3
        for key, _ in sel.select(timeout=0.1):
            c = key.data
            if c is None:  # a line (or EOF) on stdin: release everything
                open_count = 0
                break
            try:
                data = c["sock"].recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if data:
                c["answer"] += data
                if c["kind"] == "keepalive" and b"\r\n\r\n" in c["answer"]:
                    continue  # the /health answer: now idle on a keep-alive connection
            if not data:
                c["closed"] = round(time.monotonic() - t0, 3)
                sel.unregister(c["sock"])
                open_count -= 1
    report = {}
    for c in conns:
        r = report.setdefault(c["kind"], {"opened": 0, "closed_by_server": 0, "max_seconds": 0.0, "statuses": {}})
        r["opened"] += 1
        if c["closed"] is not None:
            r["closed_by_server"] += 1
            r["max_seconds"] = max(r["max_seconds"], c["closed"])
        for line in c["answer"].split(b"\r\n"):
            if line.startswith(b"HTTP/1.1 "):
                status = line.split()[1].decode()
                r["statuses"][status] = r["statuses"].get(status, 0) + 1
        c["sock"].close()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
