import threading
import time

import pytest

from modules.jobs import JobInterrupted, JobQueue


@pytest.fixture
def q():
    queue = JobQueue("test")
    yield queue
    queue.shutdown()


def test_concurrent_submissions_run_in_arrival_order_and_none_lost(q):
    order, lock = [], threading.Lock()
    jobs = []

    def submit(i):
        def fn(job):
            with lock:
                order.append(i)
            return i * 2
        with lock:  # record arrival order together with the submission
            jobs.append((i, q.submit(fn, name=f"j{i}")))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(job.result(10) for _, job in jobs) == [i * 2 for i in range(40)]
    assert order == [i for i, _ in jobs], "jobs run in the order they were queued"
    assert q.completed == 40


def test_failing_job_raises_to_caller_and_worker_lives(q):
    def boom(job):
        raise ValueError("bad input: width must be a multiple of 8")
    job = q.submit(boom, name="boom")
    with pytest.raises(ValueError, match="multiple of 8"):
        job.result(5)
    assert job.state == "failed"
    assert q.submit(lambda job: "still alive").result(5) == "still alive"


def test_interrupt_running_job(q):
    started = threading.Event()

    def long(job):
        started.set()
        for step in range(1000):
            time.sleep(0.01)
            job.report(step, 1000)
        return "finished"

    job = q.submit(long, name="long")
    started.wait(5)
    assert q.interrupt(job.id)
    with pytest.raises(JobInterrupted):
        job.result(5)
    assert job.state == "interrupted" and job.progress.step < 1000


def test_interrupt_queued_job_never_runs(q):
    gate = threading.Event()
    first = q.submit(lambda job: gate.wait(5), name="first")
    ran = []
    second = q.submit(lambda job: ran.append(1), name="second")
    q.interrupt(second.id)
    gate.set()
    first.result(5)
    with pytest.raises(JobInterrupted):
        second.result(5)
    assert ran == []


def test_progress_eta_and_skip(q):
    seen = {}
    gate = threading.Event()

    def fn(job):
        for step in range(1, 6):
            job.report(step, 10, text="sampling")
            time.sleep(0.02)
        seen["fraction"] = job.progress.fraction
        seen["eta"] = job.progress.eta
        gate.wait(5)
        return job.take_skip(), job.take_skip()

    job = q.submit(fn)
    time.sleep(0.3)
    job.skip()
    gate.set()
    assert job.result(5) == (True, False)
    assert seen["fraction"] == 0.5 and seen["eta"] > 0


def test_streaming(q):
    def fn(job):
        for token in ["a", "b", "c"]:
            job.emit(token)
        return "abc"
    job = q.submit(fn)
    assert list(job.stream(timeout=5)) == ["a", "b", "c"] and job.result(5) == "abc"


def test_batchable_jobs_waiting_together_run_as_one_batch(q):
    gate = threading.Event()
    q.submit(lambda job: gate.wait(5), name="blocker")
    batches = []

    def run_batch(jobs):
        batches.append([j.payload for j in jobs])
        return [p.upper() for p in (j.payload for j in jobs)]

    jobs = [q.submit_batchable("llm:x", word, run_batch) for word in ("a", "b", "c")]
    other = q.submit(lambda job: "other")
    late = q.submit_batchable("llm:x", "d", run_batch)
    gate.set()
    assert [j.result(5) for j in jobs] == ["A", "B", "C"]
    assert other.result(5) == "other" and late.result(5) == "D"
    assert batches == [["a", "b", "c"], ["d"]]


def test_interrupt_and_skip_reach_only_the_chosen_owner_and_kind(q):
    """Regression (issue 7.1): interrupt used to stop every running job; now callers choose by owner/kind."""
    gate = threading.Event()

    def wait_and_count(job):
        steps = 0
        while not gate.is_set():
            job.report(steps, 1000)  # raises JobInterrupted once this job is interrupted
            steps += 1
            time.sleep(0.005)
        return job.take_skip()

    chat = q.submit_batchable("llm:x", "hi", lambda jobs: [wait_and_count(j) for j in jobs], kind="llm",
                              owner="api")
    while chat.state != "running":
        time.sleep(0.01)
    alice = q.submit(wait_and_count, kind="diffusion", owner="user:alice")
    bob = q.submit(wait_and_count, kind="diffusion", owner="user:bob")
    assert [j.id for j in q.find(kind="diffusion")] == [alice.id, bob.id]  # both still waiting behind the chat
    assert q.find(kind="diffusion", owner="user:bob") == [bob]
    assert q.find(kind="diffusion", running_only=True) == []
    assert q.find(owner="api") == [chat] and q.find(kind="llm", owner=None) == []
    for job in q.find(kind="diffusion", owner="user:alice"):
        job.interrupt()
    gate.set()
    assert chat.result(5) is False and bob.result(5) is False
    with pytest.raises(JobInterrupted):
        alice.result(5)
    assert alice.state == "interrupted" and bob.state == chat.state == "done"
    assert q.find() == []


def test_skipped_lasts_from_the_press_until_the_next_item(q):
    seen = {}
    pressed, taken = threading.Event(), threading.Event()

    def two_items(job):
        job.report(1, 4)
        pressed.wait(5)
        seen["pending"] = job.skipped  # pressed, not acted on yet
        seen["took"] = job.take_skip()
        seen["after_take"] = job.skipped  # the item is being abandoned
        taken.set()
        job.report(1, 4)  # still the skipped item
        seen["same_item"] = job.skipped
        job.report(3, 4)  # progress on the next item
        seen["next_item"] = job.skipped
        return "ok"

    job = q.submit(two_items)
    while job.progress.step < 1:
        time.sleep(0.01)
    assert job.skipped is False
    job.skip()
    pressed.set()
    assert job.result(5) == "ok"
    assert seen == {"pending": True, "took": True, "after_take": True, "same_item": True, "next_item": False}
    assert job.skipped is False  # finished jobs are never "skipped"


def test_shutdown_interrupts_every_job():
    queue = JobQueue("closing")
    started = threading.Event()

    def forever(job):
        started.set()
        while True:
            job.check_interrupted()
            time.sleep(0.01)

    running = queue.submit(forever, kind="llm", owner="a")
    waiting = queue.submit(forever, kind="diffusion", owner="b")
    started.wait(5)
    queue.shutdown()
    for job in (running, waiting):
        with pytest.raises(JobInterrupted):
            job.result(5)


def test_owners_of_ui_sessions_users_and_api_clients():
    import base64
    from types import SimpleNamespace

    from modules.job_owner import api_owner, ui_owner
    assert ui_owner(SimpleNamespace(username=None, session_hash="abc")) == "session:abc"
    assert ui_owner(SimpleNamespace(username="alice", session_hash="abc")) == "user:alice"  # every tab of hers
    assert ui_owner(None) is None
    basic = {"authorization": "Basic " + base64.b64encode(b"bob:secret").decode()}
    assert api_owner(basic, api_auth=True) == "api:bob"
    assert api_owner(basic, api_auth=False) == "api"  # unchecked credentials are no identity
    assert api_owner({"authorization": "Basic !!"}, api_auth=True) == "api"
    assert api_owner({}, api_auth=True) == "api"


def test_worker_thread_setup_runs_once_in_the_worker_before_the_first_job():
    calls = []
    queue = JobQueue("setup", on_worker_start=lambda: calls.append(threading.current_thread().name))
    try:
        assert queue.submit(lambda job: threading.current_thread().name).result(5) == "jobs-setup"
        queue.submit(lambda job: None).result(5)
        assert calls == ["jobs-setup"]
    finally:
        queue.shutdown()


def test_call_runs_on_the_worker_and_inline_from_inside_a_job(q):
    """Device work from any thread goes to the worker; a job that needs more device work (a script switching
    checkpoints) runs it inline instead of queueing behind itself for ever."""
    assert q.call(lambda job: threading.current_thread().name, timeout=5) == "jobs-test"
    nested = q.submit(lambda job: q.call(lambda inner: (threading.current_thread().name, q.in_worker)))
    assert nested.result(5) == ("jobs-test", True)
    assert not q.in_worker
    with pytest.raises(ValueError, match="bad"):
        q.call(lambda job: (_ for _ in ()).throw(ValueError("bad")), timeout=5)


def test_stream_batches_hand_over_everything_already_emitted(q):
    """A consumer that falls behind gets every waiting item in one step (the API's SSE pays one thread hop per
    batch); nothing is lost or reordered, and the job's error still reaches the consumer."""
    release = threading.Event()

    def work(job):
        for token in "abc":
            job.emit(token)
        release.wait(5)
        job.emit("d")
        raise ValueError("broken at d")

    job = q.submit(work)
    batches = job.stream_batches(timeout=5)
    time.sleep(0.2)  # a, b and c are queued before the consumer looks
    assert next(batches) == ["a", "b", "c"]
    release.set()
    assert next(batches) == ["d"]
    with pytest.raises(ValueError, match="broken at d"):
        next(batches)


def test_an_asyncio_consumer_gets_every_item_in_order_the_error_and_can_leave_early():
    import asyncio

    from modules.jobs import Job

    def produce(job, n, error=None):
        for i in range(n):
            job.emit(i)
            if i % 7 == 0:
                time.sleep(0.002)                     # let the consumer catch up and wait for some items
        job.finish(None, error)

    async def consume(job):
        return [item async for batch in job.stream_batches_async() for item in batch]

    job = Job(None, "stream")
    job.emit("early")                                 # put before the consumer subscribed: still delivered
    producer = threading.Thread(target=produce, args=(job, 200))
    producer.start()
    assert asyncio.run(consume(job)) == ["early", *range(200)]
    producer.join()
    assert job._waker is None

    failing = Job(None, "fails")
    threading.Thread(target=produce, args=(failing, 3, ValueError("boom"))).start()
    with pytest.raises(ValueError, match="boom"):
        asyncio.run(consume(failing))

    async def leave_after_first(job):
        async for _ in job.stream_batches_async():
            break                                     # the client went away

    leaving = Job(None, "leaves")
    leaving.emit(1)
    asyncio.run(leave_after_first(leaving))
    assert leaving._waker is None
    leaving.emit(2)                                   # a producer that goes on after the consumer left is fine
