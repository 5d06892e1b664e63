"""The paged engine on the fixture model: logits and tokens equal the contiguous engine's, chunked prefill
interleaves with decode, the prefix cache serves repeated prompts, preemption and cancellation free blocks."""
import threading

import pytest
import torch

from modules.jobs import JobQueue
from modules.llm.engine import GenerationRequest, LLMEngine, generate
from modules.llm.paged.kv_memory import KVCacheExhausted, new_pool
from modules.llm.paged.paged_cache import BlockTable, PagedBatch
from modules.llm.paged.paged_engine import generate_paged
from modules.llm.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from modules.fixtures import llm as fixture
    from modules.llm.loader import load_llm
    return load_llm(fixture.write(tmp_path_factory.mktemp("paged"))[0], "cpu", torch.float32)


PROMPTS = ["Hello! How are you today?", "The quick brown fox", "Once upon a time there was a little robot who",
           "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"]


def ids(llm, text):
    return llm.tokenizer.encode(text, add_bos=True)


def greedy(n=20):
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)


class Sink:
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


def test_paged_prefill_and_decode_logits_equal_contiguous(llm):
    """Two rows of different lengths through PagedBatch (chunked prefill, then decode) give the logits of
    each row run alone on the contiguous cache."""
    model = llm.model
    rows = [ids(llm, PROMPTS[2]) + ids(llm, PROMPTS[1]), ids(llm, PROMPTS[0])]
    pool = new_pool(llm, 16)
    tables = [BlockTable(pool), BlockTable(pool)]
    for t, r in zip(tables, rows):
        t.add([pool.allocate() for _ in range(t.blocks_needed(len(r) + 3))])
    with torch.no_grad():
        ref = []
        for r in rows:
            full = model(torch.tensor([r + [5, 6]]))[0]             # the prompt, then two "decoded" tokens
            ref.append(full)
        # prefill: row 0 in two chunks (the second together with row 1's whole prompt), then two decode steps
        c0 = len(rows[0]) - 7
        out = {}
        view = PagedBatch(pool, tables[:1], [0], [c0], llm.device)
        out[0] = [model(torch.tensor([rows[0][:c0]]), positions=view.positions, cache=view, key_mask=view.key_mask)[0]]
        new = [len(rows[0]) - c0, len(rows[1])]
        T = max(new)
        batch = torch.zeros((2, T), dtype=torch.long)
        batch[0, T - new[0]:] = torch.tensor(rows[0][c0:])
        batch[1, T - new[1]:] = torch.tensor(rows[1])
        view = PagedBatch(pool, tables, [c0, 0], new, llm.device)
        logits = model(batch, positions=view.positions, cache=view, key_mask=view.key_mask)
        out[0].append(logits[0, T - new[0]:])
        out[1] = [logits[1, T - new[1]:]]
        for step, token in enumerate([5, 6]):
            cached = [len(r) + step for r in rows]
            view = PagedBatch(pool, tables, cached, [1, 1], llm.device)
            logits = model(torch.tensor([[token], [token]]), positions=view.positions, cache=view,
                           key_mask=view.key_mask, last_only=True)
            out[0].append(logits[0])
            out[1].append(logits[1])
    for j in range(2):
        got = torch.cat(out[j])
        assert got.shape == ref[j].shape
        assert torch.allclose(got, ref[j], atol=1e-4, rtol=0), (got - ref[j]).abs().max()


def test_greedy_concurrent_requests_equal_contiguous_engine_and_solo_runs(llm):
    requests = lambda: [GenerationRequest(ids(llm, p), greedy(12 + 7 * i)) for i, p in enumerate(PROMPTS)]
    old = generate(llm, requests())
    pool = new_pool(llm, 64)
    sinks = [Sink() for _ in PROMPTS]
    new = generate_paged(llm, pool, requests(), sinks, token_budget=24)
    solo = [generate(llm, [r])[0] for r in requests()]
    assert [r.token_ids for r in new] == [r.token_ids for r in old] == [r.token_ids for r in solo]
    assert [r.text for r in new] == [r.text for r in old] == [s.text for s in sinks]
    assert [r.finish_reason for r in new] == ["length"] * 4
    assert pool.free_blocks == pool.usable_blocks


def test_seeded_sampling_equals_contiguous_engine(llm):
    requests = lambda: [GenerationRequest(ids(llm, p), SamplingParams(temperature=0.9, top_p=0.9, seed=11 + i,
                                                                     max_new_tokens=16, repetition_penalty=1.1,
                                                                     logit_bias={5: 3.0}))
                        for i, p in enumerate(PROMPTS)]
    assert [r.token_ids for r in generate_paged(llm, new_pool(llm, 64), requests())] == \
        [r.token_ids for r in generate(llm, requests())]


def test_logprobs_and_prompt_logprobs_equal_contiguous_engine(llm):
    def requests():
        return [GenerationRequest(ids(llm, PROMPTS[i]), greedy(6), logprobs=2, prompt_logprobs=i == 0)
                for i in range(2)]
    old, new = generate(llm, requests()), generate_paged(llm, new_pool(llm, 32), requests(), token_budget=5)
    for o, n in zip(old, new):
        assert n.token_ids == o.token_ids
        assert n.token_logprobs == pytest.approx(o.token_logprobs, abs=1e-4)
        assert (n.prompt_logprobs is None) == (o.prompt_logprobs is None)
        if o.prompt_logprobs:
            assert n.prompt_logprobs[0] is None and len(n.prompt_logprobs) == len(o.prompt_logprobs)
            assert n.prompt_logprobs[1:] == pytest.approx(o.prompt_logprobs[1:], abs=1e-4)


class ScriptedArrivals:
    """Hands out requests from the *k*-th call of take() on (one take per engine step)."""

    def __init__(self, schedule):
        self.schedule, self.calls, self.joined = list(schedule), 0, []

    def take(self, fits, limit):
        self.calls += 1
        out = []
        while self.schedule and self.schedule[0][0] <= self.calls and len(out) < limit and fits(self.schedule[0][1]):
            _step, request, sink = self.schedule.pop(0)
            out.append((request, sink))
            self.joined.append(self.calls)
        return out


def test_requests_join_mid_decode_and_a_long_prompt_prefills_in_chunks_while_others_decode(llm):
    long_prompt = (ids(llm, " ".join(PROMPTS)) * 4)[:150]
    first = GenerationRequest(ids(llm, "The quick"), greedy(40))
    first_sink = Sink()
    late_sink, long_sink = Sink(), Sink()
    arrivals = ScriptedArrivals([(3, GenerationRequest(ids(llm, PROMPTS[1]), greedy(10)), late_sink),
                                 (5, GenerationRequest(long_prompt, greedy(5)), long_sink)])

    class Watch(Sink):
        """Records, at each of the first row's tokens, whether the long prompt had produced a token yet."""

        def emit(self, item):
            super().emit(item)
            self.log.append(len(long_sink.items))

    first_sink = Watch()
    first_sink.log = []
    done = []
    generate_paged(llm, new_pool(llm, 64), [first], [first_sink], arrivals=arrivals, token_budget=32,
                   on_done=lambda s, r: done.append((s, r)))
    assert arrivals.joined == [3, 5]
    # 150 prompt tokens at <= 31 per step (the budget less the decode rows) take 5 steps; the first row got a
    # token in each of them (its tokens 5..9 were streamed before the long prompt's first token)
    assert first_sink.log[4:9] == [0, 0, 0, 0, 0]
    solo = {id(s): generate(llm, [r])[0] for s, r in
            [(first_sink, first), (late_sink, GenerationRequest(ids(llm, PROMPTS[1]), greedy(10))),
             (long_sink, GenerationRequest(long_prompt, greedy(5)))]}
    for sink, result in done:
        assert result.token_ids == solo[id(sink)].token_ids


def test_prefix_cache_serves_a_repeated_system_prompt(llm):
    system = (ids(llm, " ".join(PROMPTS)) * 2)[:70]
    pool = new_pool(llm, 64)
    a = generate_paged(llm, pool, [GenerationRequest(system + ids(llm, "Hello")[1:], greedy(8))])[0]
    assert a.cached_tokens == 0
    b = generate_paged(llm, pool, [GenerationRequest(system + ids(llm, "Hello")[1:], greedy(8))])[0]
    c = generate_paged(llm, pool, [GenerationRequest(system + ids(llm, "The fox")[1:], greedy(8))])[0]
    assert b.cached_tokens == 64 and c.cached_tokens == 64     # the 4 full 16-token blocks of the system prompt
    assert b.token_ids == a.token_ids
    assert c.token_ids == generate(llm, [GenerationRequest(system + ids(llm, "The fox")[1:], greedy(8))])[0].token_ids
    off = generate_paged(llm, pool, [GenerationRequest(system + ids(llm, "Hello")[1:], greedy(8))],
                         prefix_caching=False)[0]
    assert off.cached_tokens == 0 and off.token_ids == a.token_ids


def test_n_samples_of_one_prompt_share_its_blocks(llm):
    prompt = (ids(llm, " ".join(PROMPTS)) * 2)[:50]
    pool = new_pool(llm, 64)
    peak = []

    class Probe(Sink):
        def emit(self, item):
            super().emit(item)
            peak.append(pool.usable_blocks - pool.free_blocks)

    requests = [GenerationRequest(list(prompt), SamplingParams(temperature=1.0, seed=i, max_new_tokens=4))
                for i in range(4)]
    results = generate_paged(llm, pool, requests, [Probe() for _ in requests])
    assert [r.cached_tokens for r in results] == [0, 48, 48, 48]
    # 3 shared prompt blocks + one private block each, instead of 4 x 4
    assert max(peak) == 3 + 4
    assert [r.token_ids for r in results] == [r.token_ids for r in generate(llm, requests)]


def test_preemption_by_recompute_gives_identical_output(llm):
    requests = lambda: [GenerationRequest(ids(llm, p), greedy(40)) for p in PROMPTS] + \
        [GenerationRequest(ids(llm, PROMPTS[1]), SamplingParams(temperature=0.8, seed=5, max_new_tokens=40))]
    expected = [r.token_ids for r in generate(llm, requests())]
    for caching in (True, False):
        pool = new_pool(llm, 8)        # 7 blocks = 112 tokens for five rows needing ~50-60 each
        results = generate_paged(llm, pool, requests(), prefix_caching=caching, token_budget=16)
        assert pool.preemptions > 0, "the tiny pool should have forced preemption"
        assert [r.token_ids for r in results] == expected
        assert pool.free_blocks == pool.usable_blocks


def test_cancellation_frees_blocks_at_once(llm):
    pool = new_pool(llm, 32)
    held = []

    class Stopper(Sink):
        def emit(self, item):
            super().emit(item)
            held.append(pool.usable_blocks - pool.free_blocks)

    stopped, running = Stopper(stop_after=3), Stopper()
    results = generate_paged(llm, pool, [GenerationRequest(ids(llm, PROMPTS[3]), greedy(30)),
                                         GenerationRequest(ids(llm, PROMPTS[0]), greedy(30))], [stopped, running],
                             prefix_caching=False)
    assert results[0].finish_reason == "interrupted" and results[0].completion_tokens == 3
    assert results[1].completion_tokens == 30
    # while both ran, both rows held blocks; after the stop only the running row's (<= 3 blocks for 40 tokens)
    assert max(held[:4]) > max(held[8:])
    assert pool.free_blocks == pool.usable_blocks


def test_a_request_larger_than_the_pool_fails_alone_with_a_clear_error(llm):
    jobs = JobQueue("test-paged")

    class Lease:
        model = llm

        def release(self):
            pass

    pool = new_pool(llm, 3)   # 32 tokens
    engine = LLMEngine(jobs, "tiny", lambda: Lease(), kv_pool=lambda lease: pool)
    gate = threading.Event()
    jobs.submit(lambda job: gate.wait(10), name="blocker")
    try:
        small = engine.submit(GenerationRequest(ids(llm, PROMPTS[1]), greedy(8)))
        huge = engine.submit(GenerationRequest(ids(llm, PROMPTS[3]), greedy(40)))
        gate.set()
        assert small.result(60).completion_tokens == 8
        with pytest.raises(KVCacheExhausted, match="llm.kv_cache_mb"):
            huge.result(60)
        again = engine.submit(GenerationRequest(ids(llm, PROMPTS[1]), greedy(8)))
        assert again.result(60).token_ids == small.result().token_ids
    finally:
        jobs.shutdown()


def test_engine_can_still_run_the_contiguous_loop(llm):
    jobs = JobQueue("test-contiguous")

    class Lease:
        model = llm

        def release(self):
            pass

    try:
        paged = LLMEngine(jobs, "a", lambda: Lease()).submit(GenerationRequest(ids(llm, PROMPTS[0]), greedy(8)))
        old = LLMEngine(jobs, "b", lambda: Lease(), paged=False).submit(
            GenerationRequest(ids(llm, PROMPTS[0]), greedy(8)))
        assert paged.result(60).token_ids == old.result(60).token_ids
    finally:
        jobs.shutdown()
