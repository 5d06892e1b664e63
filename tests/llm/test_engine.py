"""Generation engine on the fixture model: parity with transformers, batching, stop strings, EOS, interrupts."""
import threading

import pytest
import torch

from modules.jobs import JobQueue
from modules.llm.engine import (GenerationRequest, LLMEngine, PromptTooLong, find_stop, generate, held_suffix)
from modules.llm.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    from modules.fixtures import llm as fixture
    return fixture.write(tmp_path_factory.mktemp("engine"))[0]


@pytest.fixture(scope="module")
def llm(llm_folder):
    from modules.llm.loader import load_llm
    return load_llm(llm_folder, "cpu", torch.float32)


PROMPTS = ["Hello! How are you today?", "The quick brown fox", "Once upon a time there was a little robot who"]


def ids_for(llm, text):
    return llm.tokenizer.encode(text, add_bos=True)


def greedy(max_new=24, **kw):
    return SamplingParams(temperature=0, max_new_tokens=max_new, **kw)


class Sink:
    """Collects streamed deltas; reports interrupted after *stop_after* deltas."""

    def __init__(self, stop_after=None):
        self.items, self.stop_after = [], stop_after

    def emit(self, item):
        self.items.append(item)

    @property
    def interrupted(self):
        return self.stop_after is not None and len(self.items) >= self.stop_after

    @property
    def text(self):
        return "".join(d.text for d in self.items)


def test_greedy_equals_transformers_generate(llm, llm_folder):
    from transformers import LlamaForCausalLM
    reference = LlamaForCausalLM.from_pretrained(llm_folder, dtype=torch.float32).eval()
    for text in PROMPTS:
        ids = ids_for(llm, text)
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     do_sample=False, max_new_tokens=24, eos_token_id=2, pad_token_id=2)
        expected = out[0, len(ids):].tolist()
        ours = generate(llm, [GenerationRequest(ids, greedy())])[0]
        assert ours.token_ids == expected[:len(ours.token_ids)]
        assert len(ours.token_ids) == len(expected)
        assert ours.text == llm.tokenizer.decode([t for t in ours.token_ids if t != 2])


def test_batched_equals_one_at_a_time(llm):
    """Ragged prompts, different lengths and settings: the left-padded batch gives each row's own tokens."""
    requests = [GenerationRequest(ids_for(llm, p), greedy(max_new=n)) for p, n in zip(PROMPTS, (20, 8, 14))]
    requests.append(GenerationRequest(ids_for(llm, PROMPTS[0]),
                                      SamplingParams(temperature=0.9, top_k=20, seed=5, max_new_tokens=12)))
    singles = [generate(llm, [r])[0] for r in requests]
    batch = generate(llm, requests)
    for one, many in zip(singles, batch):
        assert many.token_ids == one.token_ids
        assert many.text == one.text and many.finish_reason == one.finish_reason
    assert [len(r.token_ids) for r in batch[:3]] == [20, 8, 14]


def test_seeded_sampling_is_reproducible(llm):
    ids = ids_for(llm, PROMPTS[1])
    params = dict(temperature=1.0, top_p=0.9, min_p=0.02, repetition_penalty=1.1, max_new_tokens=20)
    a = generate(llm, [GenerationRequest(ids, SamplingParams(seed=1234, **params))])[0]
    b = generate(llm, [GenerationRequest(ids, SamplingParams(seed=1234, **params))])[0]
    c = generate(llm, [GenerationRequest(ids, SamplingParams(seed=4321, **params))])[0]
    assert a.token_ids == b.token_ids and a.seed == 1234
    assert a.token_ids != c.token_ids


def test_stop_string_ends_reply_and_is_never_streamed(llm):
    ids = ids_for(llm, PROMPTS[2])
    full = generate(llm, [GenerationRequest(ids, greedy(max_new=40))])[0]
    assert len(full.text) > 12
    stop = full.text[8:12]  # a stop string spanning whatever token boundaries the model produced
    index = full.text.find(stop)
    sink = Sink()
    stopped = generate(llm, [GenerationRequest(ids, greedy(max_new=40, stop=["\u2603never", stop]))], [sink])[0]
    assert stopped.text == full.text[:index]
    assert stopped.finish_reason == "stop" and stopped.stop_string == stop
    assert sink.text == stopped.text
    assert stop not in sink.text
    assert len(stopped.token_ids) < len(full.token_ids)


def test_stream_deltas_concatenate_to_the_text(llm):
    sink = Sink()
    result = generate(llm, [GenerationRequest(ids_for(llm, PROMPTS[0]), greedy(max_new=30))], [sink])[0]
    assert sink.text == result.text
    assert [d.index for d in sink.items] == list(range(len(result.token_ids)))


def test_stop_string_helpers():
    assert find_stop("abc END def", ["END", "c E"]) == (2, "c E")
    assert find_stop("abc", ["x"]) is None
    assert held_suffix("hello wor", ["world"]) == 3
    assert held_suffix("hello", ["world"]) == 0
    assert held_suffix("aa", ["aab"]) == 2


def test_eos_ends_with_stop_and_is_not_in_the_text(llm):
    ids = ids_for(llm, PROMPTS[0])
    full = generate(llm, [GenerationRequest(ids, greedy(max_new=20))])[0]
    eos_like = full.token_ids[5]
    first = full.token_ids.index(eos_like)
    llm.generation_config["eos_token_id"] = [2, eos_like]
    try:
        result = generate(llm, [GenerationRequest(ids, greedy(max_new=20))])[0]
        ignored = generate(llm, [GenerationRequest(ids, greedy(max_new=20, ignore_eos=True))])[0]
    finally:
        llm.generation_config.pop("eos_token_id")
    assert result.finish_reason == "stop"
    assert result.token_ids == full.token_ids[:first + 1]
    assert result.text == llm.tokenizer.decode(full.token_ids[:first])
    assert ignored.token_ids == full.token_ids and ignored.finish_reason == "length"


def test_max_tokens_and_full_context_finish_with_length(llm):
    ctx = llm.config.max_position_embeddings
    short = generate(llm, [GenerationRequest(ids_for(llm, PROMPTS[0]), greedy(max_new=3))])[0]
    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    long_ids = (ids_for(llm, PROMPTS[1] * 40) * 4)[: ctx - 5]
    near = generate(llm, [GenerationRequest(long_ids, greedy(max_new=100, ignore_eos=True))])[0]
    assert near.finish_reason == "length" and near.completion_tokens == 5
    assert near.prompt_tokens + near.completion_tokens == ctx


def test_prompt_too_long_is_a_clear_error(llm):
    ctx = llm.config.max_position_embeddings
    with pytest.raises(PromptTooLong, match=f"context is {ctx} tokens"):
        generate(llm, [GenerationRequest([1] * ctx, greedy())])
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(llm, [GenerationRequest([], greedy())])


def test_interrupted_row_stops_and_others_finish(llm):
    stopper, other = Sink(stop_after=3), Sink()
    results = generate(llm, [GenerationRequest(ids_for(llm, PROMPTS[0]), greedy(max_new=30, ignore_eos=True)),
                             GenerationRequest(ids_for(llm, PROMPTS[1]), greedy(max_new=10, ignore_eos=True))],
                       [stopper, other])
    assert results[0].finish_reason == "interrupted" and results[0].completion_tokens == 3
    assert results[1].finish_reason == "length" and results[1].completion_tokens == 10


class _Lease:
    def __init__(self, model):
        self.model = model
        self.released = 0

    def release(self):
        self.released += 1


def test_job_queue_batches_requests_that_arrive_together(llm):
    jobs = JobQueue("test-llm")
    leases, batches = [], []
    engine = LLMEngine(jobs, "tiny", lambda: leases.append(_Lease(llm)) or leases[-1])
    original = engine._run_batch
    engine._run_batch = lambda js: batches.append(len(js)) or original(js)
    gate = threading.Event()
    jobs.submit(lambda job: gate.wait(10), name="blocker")  # hold the worker so the requests queue up
    try:
        requests = [GenerationRequest(ids_for(llm, p), greedy(max_new=8)) for p in PROMPTS]
        handles = [engine.submit(r) for r in requests]
        gate.set()
        streamed = ["".join(d.text for d in h.events(timeout=60)) for h in handles]
        results = [h.result(60) for h in handles]
    finally:
        jobs.shutdown()
    assert batches == [3]
    assert all(lease.released == 1 for lease in leases) and len(leases) == 1
    singles = [generate(llm, [GenerationRequest(ids_for(llm, p), greedy(max_new=8))])[0] for p in PROMPTS]
    assert [r.token_ids for r in results] == [s.token_ids for s in singles]
    assert streamed == [r.text for r in results]


class ScriptedArrivals:
    """Hands out (request, sink) pairs once the batch has taken *after* decode steps."""

    def __init__(self, schedule):
        self.schedule, self.calls, self.joined = sorted(schedule, key=lambda x: x[0]), 0, []

    def take(self, fits, limit):
        self.calls += 1
        out = []
        while self.schedule and self.schedule[0][0] <= self.calls and len(out) < limit and fits(self.schedule[0][1]):
            _step, request, sink = self.schedule.pop(0)
            out.append((request, sink))
            self.joined.append((self.calls, request))
        return out


def test_requests_join_a_running_batch_and_match_solo_runs(llm):
    """Continuous batching: newcomers join mid-decode (longer and shorter prompts than the batch's slots,
    after rows left and freed leading slots) and still produce exactly their solo tokens."""
    long_prompt = ids_for(llm, " ".join(PROMPTS) * 2)
    first = [GenerationRequest(ids_for(llm, "The quick"), greedy(max_new=60, ignore_eos=True)),
             GenerationRequest(long_prompt, greedy(max_new=3, ignore_eos=True))]
    late = [(4, GenerationRequest(long_prompt[:70], greedy(max_new=12, ignore_eos=True)), Sink()),
            (9, GenerationRequest(ids_for(llm, PROMPTS[1]), SamplingParams(temperature=0.8, seed=3,
                                                                          max_new_tokens=10)), Sink()),
            (30, GenerationRequest(ids_for(llm, "Hello"), greedy(max_new=5, ignore_eos=True)), Sink())]
    arrivals = ScriptedArrivals(list(late))
    done = []
    results = generate(llm, first, [Sink(), Sink()], arrivals=arrivals, on_done=lambda s, r: done.append((s, r)))
    assert [step for step, _ in arrivals.joined] == [4, 9, 30]
    solo = {id(r): generate(llm, [r])[0] for r in [*first, *(req for _s, req, _k in late)]}
    for request, result in zip(first, results):
        assert result.token_ids == solo[id(request)].token_ids
    by_sink = {id(sink): result for sink, result in done}
    for _step, request, sink in late:
        assert by_sink[id(sink)].token_ids == solo[id(request)].token_ids
        assert sink.text == by_sink[id(sink)].text
    assert len(done) == 5
    # the late short request finished long before the 60-token row
    order = [r.completion_tokens for _s, r in done]
    assert order.index(5) < order.index(60)


def test_arrival_joins_only_once_it_fits_the_slot_budget(llm):
    ctx = llm.config.max_position_embeddings
    big = GenerationRequest((ids_for(llm, PROMPTS[2]) * 20)[:230], greedy(max_new=20, ignore_eos=True))
    arrivals = ScriptedArrivals([(1, big, Sink())])
    running = GenerationRequest((ids_for(llm, PROMPTS[0]) * 3)[:20], greedy(max_new=ctx, ignore_eos=True))
    done = []
    result = generate(llm, [running], [Sink()], arrivals=arrivals, on_done=lambda s, r: done.append(r))[0]
    assert result.completion_tokens == ctx - 20
    # joining needs 230 prompt slots + the running row's remaining tokens (236 - sampled) <= 1.5 x 256 = 384:
    # at the k-th step k - 1 tokens are sampled, so it first fits at k = 83
    assert [step for step, _ in arrivals.joined] == [83]
    assert done[0].token_ids == generate(llm, [big])[0].token_ids


def test_job_interrupt_keeps_partial_reply(llm):
    jobs = JobQueue("test-llm-int")
    engine = LLMEngine(jobs, "tiny", lambda: _Lease(llm))
    try:
        handle = engine.submit(GenerationRequest(ids_for(llm, PROMPTS[0]), greedy(max_new=200, ignore_eos=True)))
        seen = 0
        for _delta in handle.events(timeout=60):
            seen += 1
            if seen == 2:
                handle.interrupt()
        result = handle.result(60)
    finally:
        jobs.shutdown()
    assert result.finish_reason == "interrupted"
    assert 2 <= result.completion_tokens < 200


def test_engine_pulls_in_requests_that_arrive_while_decoding(llm):
    jobs = JobQueue("test-llm-cb")
    calls = []
    engine = LLMEngine(jobs, "tiny", lambda: _Lease(llm))
    original = engine._run_batch
    engine._run_batch = lambda js: calls.append(len(js)) or original(js)
    try:
        long = engine.submit(GenerationRequest(ids_for(llm, PROMPTS[0]), greedy(max_new=200, ignore_eos=True)))
        stream = long.events(timeout=60)
        next(stream)  # the long reply is decoding
        short_request = GenerationRequest(ids_for(llm, PROMPTS[1]), greedy(max_new=4, ignore_eos=True))
        short = engine.submit(short_request).result(60)
        assert not long.done  # it finished while the long one was still going
        rest = list(stream)
        assert long.result(60).completion_tokens == 200 and rest
    finally:
        jobs.shutdown()
    assert calls == [1]  # one batch: the short request joined it
    assert short.token_ids == generate(llm, [short_request])[0].token_ids


def test_invalid_params_are_rejected_at_submit(llm):
    jobs = JobQueue("test-llm-bad")
    try:
        engine = LLMEngine(jobs, "tiny", lambda: _Lease(llm))
        with pytest.raises(ValueError, match="top_p"):
            engine.submit(GenerationRequest([1, 2], SamplingParams(top_p=1.5)))
    finally:
        jobs.shutdown()
