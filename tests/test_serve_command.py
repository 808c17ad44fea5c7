"""`fisedit serve` as a user runs it: sessions kept in its `--data` folder across a restart, the
metrics where it says, and SIGTERM stopping it with every process it started."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray")
from service_helpers import free_port, mask_png, png_array  # noqa: E402

from fisedit_ray.masks import blob_mask  # noqa: E402

PROMPT, EDIT = "a red circle at the top left", "a blue square at the center"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))) if fields else None


def descendants(root: int) -> dict[int, int]:
    """Every process below `root`: pid -> start time (to tell a reused pid apart)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents[int(entry)] = stat
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


class Server:
    """`fisedit serve` in a process of its own, started and stopped as a user would."""

    def __init__(self, data: Path):
        self.port, self.metrics_port = free_port(), free_port()
        command = [
            sys.executable,
            "-m",
            "fisedit_ray.cli",
            "serve",
            "--model",
            "tiny",
            "--editor-cpus",
            "0.5",
        ]
        command += ["--port", str(self.port), "--data", str(data), "--metrics-port", str(self.metrics_port)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.banner = self._wait_for("sessions kept in")  # the banner's last line
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        self.processes = descendants(self.process.pid)

    def _wait_for(self, words: str, timeout: float = 180) -> str:
        """What the process printed up to the line with `words`."""
        deadline, lines = time.monotonic() + timeout, []
        for line in self.process.stdout:
            lines.append(line)
            if words in line:
                return "".join(lines)
            assert time.monotonic() < deadline, f"no {words!r} from fisedit serve"
        raise AssertionError(f"fisedit serve exited ({self.process.wait()}) before printing {words!r}")

    def stop_with_sigterm(self) -> None:
        self.http.close()
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=120) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [pid for pid, started in self.processes.items() if (_stat(pid) or (0, None))[1] == started]
            if not left:
                return
            time.sleep(0.5)
        raise AssertionError(f"processes left behind after SIGTERM: {left}")


def test_a_restarted_service_keeps_every_session_and_rebuilds_old_versions(tmp_path):
    data = tmp_path / "data"
    server = Server(data)
    try:
        assert (
            str(data) in server.banner
            and f"http://127.0.0.1:{server.metrics_port}/metrics" in server.banner
            and f"web editor: http://127.0.0.1:{server.port}/" in server.banner
        )
        r = server.http.post("/v1/sessions", json={"prompt": PROMPT, "seed": 3, "steps": 3})
        root, auth = r.json(), {"Authorization": f"Bearer {r.json()['token']}"}
        mask = mask_png(blob_mask((16, 16), 0.2, seed=1))
        edit_url = f"/v1/sessions/{root['session_id']}/versions/{root['version_id']}/edits"
        first = server.http.post(edit_url, json={"prompt": EDIT, "mask_png": mask}, headers=auth).json()
        before = {
            v["version_id"]: server.http.get(v["image_url"], headers=auth).content for v in (root, first)
        }
        metrics = ""
        deadline = time.monotonic() + 60  # Ray exports every few seconds
        while "ray_fisedit_phase_seconds" not in metrics and time.monotonic() < deadline:
            time.sleep(1)
            metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
        assert "ray_fisedit_phase_seconds" in metrics
    finally:
        server.stop_with_sigterm()
    assert (data / "fisedit.db").exists() and list((data / "blobs").rglob("*"))

    server = Server(data)  # the same folder: the same sessions and tokens
    try:
        tree = server.http.get(f"/v1/sessions/{root['session_id']}", headers=auth).json()
        assert [v["version_id"] for v in tree["versions"]] == list(before)
        for version in tree["versions"]:
            assert (
                server.http.get(version["image_url"], headers=auth).content == before[version["version_id"]]
            )
        again = server.http.post(edit_url, json={"prompt": EDIT, "mask_png": mask}, headers=auth).json()
        assert again["stats"]["rebuilt"] == [root["version_id"]]  # no cache survived: from the lineage
        image = server.http.get(again["image_url"], headers=auth).content
        assert np.array_equal(png_array(image), png_array(before[first["version_id"]]))
        child_url = f"/v1/sessions/{root['session_id']}/versions/{first['version_id']}/edits"
        child = server.http.post(child_url, json={"prompt": "a green circle", "mask_png": mask}, headers=auth)
        assert child.status_code == 201 and child.json()["stats"]["fetched"] == []
    finally:
        server.stop_with_sigterm()
