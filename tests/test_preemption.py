"""Stop signals: checkpoint first, then (inside submitit) hand the signal to submitit's requeue handler."""

import os
import signal

import pytest

from mabn.preemption import StopSignals


@pytest.fixture(autouse=True)
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_plain_run_stops_on_sigterm_and_sigusr1(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    stops = StopSignals().install()
    assert not stops.requested and stops.describe() == "no signal"
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stops.requested and stops.describe() == "signal SIGUSR1"
    stops.hand_over()  # nothing chained: a no-op, the entry script exits 143 itself


def test_submitit_signal_is_handed_to_submitit_after_the_checkpoint(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands for submitit's handler
    bypass = signal.getsignal(signal.SIGTERM)
    stops = StopSignals().install()
    assert signal.getsignal(signal.SIGTERM) is bypass  # submitit ignores SIGTERM on purpose: left alone
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stops.requested and calls == []  # recorded only: the loop checkpoints first
    stops.hand_over()
    assert calls == [signal.SIGUSR2]


def test_submitit_preempt_signal_from_its_environment_variable(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    stops = StopSignals().install()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stops.describe() == "signal SIGUSR1"
