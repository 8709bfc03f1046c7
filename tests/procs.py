"""Running an entry point as a subprocess and stopping it the way SLURM does."""

import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sigterm_once(cmd: list[str], env: dict, started: Path, pattern: str, timeout: float = 300):
    """Start ``cmd``, wait until a file matching ``pattern`` under ``started`` exists (training has begun),
    send SIGTERM and return (exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not list(started.glob(pattern)) and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr
