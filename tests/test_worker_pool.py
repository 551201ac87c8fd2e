"""The worker pool reuses idle threads, runs every task, survives failing tasks, and shrinks."""

from __future__ import annotations

import logging
import threading

import pytest

from server.worker_pool import WorkerPool


def test_every_task_runs_with_its_arguments() -> None:
    pool = WorkerPool("t")
    done = threading.Barrier(21)
    results: list[int] = []
    lock = threading.Lock()

    def task(n: int) -> None:
        with lock:
            results.append(n * n)
        done.wait(10)

    for n in range(20):
        pool.submit(task, n)
    done.wait(10)  # all 20 ran at the same time: the pool grew to fit them
    assert sorted(results) == [n * n for n in range(20)]


def test_idle_workers_are_reused_instead_of_new_threads() -> None:
    pool = WorkerPool("reuse")
    names: list[str] = []
    for _ in range(5):
        finished = threading.Event()

        def task(finished: threading.Event = finished) -> None:
            names.append(threading.current_thread().name)
            finished.set()

        pool.submit(task)
        assert finished.wait(10)
        for _ in range(1000):  # the worker puts itself back right after the task
            if pool.idle == 1:
                break
            threading.Event().wait(0.005)
    assert len(set(names)) == 1, names


def test_a_failing_task_is_logged_and_the_worker_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool("fail")
    ran = threading.Event()

    def boom() -> None:
        raise RuntimeError("task bug")

    with caplog.at_level(logging.ERROR, logger="fluidity.workers"):
        pool.submit(boom)
        for _ in range(1000):
            if pool.idle == 1:
                break
            threading.Event().wait(0.005)
        pool.submit(ran.set)
        assert ran.wait(10)
    assert any("task failed" in r.getMessage() for r in caplog.records)


def test_idle_workers_exit_after_the_idle_timeout() -> None:
    pool = WorkerPool("shrink", idle_timeout=0.05)
    finished = threading.Event()
    pool.submit(finished.set)
    assert finished.wait(10)
    for _ in range(1000):
        if pool.idle == 0 and not any(t.name.startswith("shrink-") for t in threading.enumerate()):
            break
        threading.Event().wait(0.01)
    assert pool.idle == 0
    assert not any(t.name.startswith("shrink-") for t in threading.enumerate())
    again = threading.Event()
    pool.submit(again.set)  # a new worker is started after the old ones left
    assert again.wait(10)
