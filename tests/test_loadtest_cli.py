"""`llara loadtest`: the same flags and JSON line as `python -m llara.serve.loadtest`."""
import json
import socket

from llara.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loadtest_command_reports_every_request(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"  # nothing listens: every request fails, none is lost
    rc = main(["loadtest", "--url", url, "--requests", "6", "--concurrency", "2", "--timeout", "2"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and out["requests"] == 6 and out["ok"] == 0
    assert sum(out["statuses"].values()) == 6 and "ConnectError" in out["statuses"]
    assert set(out["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
