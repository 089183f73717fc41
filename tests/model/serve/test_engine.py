"""model.serve.engine: batched replies equal model.generate's one at a time, token for token, whatever else
shares the batch (late arrivals prefilled mid-decode, prompts arriving together prefilled in one packed
forward, rows retired and moved); seeded sampling is
reproducible; special tokens end a reply and are never text; stop strings, the context's end,
cancellation and a failing forward."""
import time

import pytest
import torch

from model.chat_format import ChatTokens
from model.serve.engine import Delta, Engine, Request, TextStream
from model.generate import generate
from posttrain_fixtures import tiny_model, tokenizer

TOK = tokenizer()
SPECIALS = tuple(TOK.special_tokens.values())        # every one ends a reply


@pytest.fixture(scope="module")
def model():
    # A larger init spreads the logits: replies vary and some end on a stop token early.
    return tiny_model(n_layer=2, init_std=0.3).eval()


@pytest.fixture
def engine(model):
    engine = Engine(model, TOK, max_batch=4)
    yield engine
    engine.close()


def prompts(n: int) -> list[list[int]]:
    return [[ChatTokens.of(TOK).bos, *TOK.encode(f"What is {i} + {3 * i}? {'and ' * i}")] for i in range(n)]


def submit(engine, request):
    deltas: list[Delta] = []
    return engine.submit(request, deltas.append), deltas


def wait(seqs, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not all(s.done for s in seqs):
        assert time.monotonic() < deadline, "requests did not finish"
        time.sleep(0.005)


def reference(model, request) -> list[int]:
    """model.generate's reply to the request, alone, without its stop token."""
    out = generate(model, torch.tensor([request.prompt]), request.max_tokens, request.temperature,
                   request.top_k, request.top_p, stop_tokens=SPECIALS, seed=request.seed)
    reply = out[0, len(request.prompt):].tolist()
    return reply[:-1] if reply[-1] in SPECIALS else reply


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=40, top_p=0.9)])
def test_batched_replies_equal_generate_alone(model, engine, sampling):
    # 10 requests through 4 rows: late ones are prefilled while others decode, rows retire at
    # different lengths (max_tokens and stop tokens) and the last row moves into each hole.
    requests = [Request(p, max_tokens=12 + 3 * i, seed=100 + i, **sampling)
                for i, p in enumerate(prompts(10))]
    started = [submit(engine, r) for r in requests[:3]]
    wait([s for s, _ in started[:1]])
    started += [submit(engine, r) for r in requests[3:]]
    wait([s for s, _ in started])
    assert engine.stats.peak_batch == 4
    for request, (seq, deltas) in zip(requests, started):
        expected = reference(model, request)
        assert seq.text.ids == expected, (requests.index(request), seq.text.ids, seq.generated, [d.text for d in deltas], id(seq.text))
        assert "".join(d.text for d in deltas) == TOK.decode(expected)
        last = deltas[-1]
        assert last.finish_reason == ("length" if len(expected) == request.max_tokens else "stop")
        assert (last.prompt_tokens, last.completion_tokens) == (len(request.prompt), request.max_tokens
                                                                if last.finish_reason == "length" else len(expected) + 1)


def submit_together(engine, requests):
    """Submit while holding the scheduler's lock, so that it finds every request waiting at once."""
    with engine._wake:
        return [submit(engine, r) for r in requests]


@pytest.mark.parametrize("prefill_tokens, forwards", [(4096, 1), (50, 3), (20, 6)])
def test_prompts_arriving_together_prefill_in_one_forward_with_the_replies_of_one_at_a_time(model, prefill_tokens,
                                                                                            forwards):
    # 6 greedy prompts of 10, 13, 16, 19, 23 and 26 tokens arrive together: one packed forward of
    # the 107 tokens, or packs of at most 50 tokens ([10, 13, 16], [19, 23], [26]), or at most 20
    # (each alone: 23 and 26 fit no pack); the replies are the same whichever, the same as with
    # prefill_tokens=1 (one at a time), and equal model.generate's alone.
    requests = [Request(p, max_tokens=10, temperature=0.0) for p in prompts(6)]
    lengths = [len(r.prompt) for r in requests]
    prefills = []
    forward = type(model).forward

    def count(self, idx, *args, **kwargs):
        if idx.shape[1] > 1:
            prefills.append((idx.shape[0], idx.shape[1], kwargs.get("documents") is not None))
        return forward(self, idx, *args, **kwargs)

    replies = {}
    for budget in (prefill_tokens, 1):
        engine = Engine(model, TOK, max_batch=8, prefill_tokens=budget)
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(type(model), "forward", count)
                started = submit_together(engine, requests)
                wait([s for s, _ in started])
            assert (engine.stats.prefilled, engine.stats.prefills) == (6, forwards if budget > 1 else 6)
            assert engine.stats.peak_batch == 6                # every prompt was admitted in the first round
            replies[budget] = [seq.text.ids for seq, _ in started]
        finally:
            engine.close()
    packed = prefills[:forwards]
    assert sum(t for _, t, _ in packed) == sum(lengths) and all(b == 1 for b, _, _ in packed)
    assert [d for _, t, d in packed] == [t not in lengths for _, t, _ in packed]   # a pack of one is plain
    assert prefills[forwards:] == [(1, n, False) for n in lengths]                 # one at a time
    assert replies[prefill_tokens] == replies[1] == [reference(model, r) for r in requests]


def test_a_failing_packed_prefill_fails_its_requests_only(model, engine, monkeypatch):
    forward = type(model).forward

    def fail(self, idx, *args, documents=None, **kwargs):
        if documents is not None:
            raise RuntimeError("out of memory in a packed prefill")
        return forward(self, idx, *args, documents=documents, **kwargs)

    monkeypatch.setattr(type(model), "forward", fail)
    running = Request(prompts(2)[1], max_tokens=40, temperature=0.0)
    seq, deltas = submit(engine, running)
    while seq.generated < 3:
        time.sleep(0.001)
    failed = submit_together(engine, [Request(p, max_tokens=5) for p in prompts(3)])
    wait([s for s, _ in failed] + [seq])
    assert all(d[-1].finish_reason == "error" and "packed prefill" in d[-1].text for _, d in failed)
    assert deltas[-1].finish_reason == "length" and seq.text.ids == reference(model, running)
    assert list(engine.stream(Request(prompts(1)[0], max_tokens=5)))[-1].finish_reason in ("stop", "length")


def test_same_seed_same_reply_alone_or_in_a_crowd(model, engine):
    request = Request(prompts(1)[0], max_tokens=20, temperature=1.0, seed=7)
    alone = "".join(d.text for d in engine.stream(request))
    crowd = [submit(engine, Request(p, max_tokens=20, temperature=1.0)) for p in prompts(3)]
    in_crowd = "".join(d.text for d in engine.stream(request))
    other_seed = "".join(d.text for d in engine.stream(Request(request.prompt, max_tokens=20, temperature=1.0, seed=8)))
    wait([s for s, _ in crowd])
    assert alone == in_crowd != other_seed


@pytest.mark.parametrize("special", list(TOK.special_tokens))
def test_a_special_token_ends_the_reply_and_is_never_text(engine, monkeypatch, special):
    # Whatever the model emits: a scripted sampler writes "ab", the special token, then more text.
    script = [*TOK.encode("ab"), TOK.special_tokens[special], *TOK.encode("junk")]
    monkeypatch.setattr(engine, "_sample", lambda logits, seqs: torch.tensor([script[s.generated] for s in seqs]))
    deltas = list(engine.stream(Request(prompts(1)[0], max_tokens=len(script))))
    assert "".join(d.text for d in deltas) == "ab"
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("stop", len(TOK.encode("ab")) + 1)


def test_stop_strings_end_the_reply_and_are_not_part_of_it(model, engine):
    request = Request(prompts(1)[0], max_tokens=30, temperature=0.0)
    full = "".join(d.text for d in engine.stream(request))
    stop = full[5:7]
    deltas = list(engine.stream(Request(request.prompt, max_tokens=30, temperature=0.0, stop=("zzz", stop))))
    assert "".join(d.text for d in deltas) == full[:full.index(stop)]
    assert deltas[-1].finish_reason == "stop"


def test_text_stream_holds_back_what_may_still_become_a_stop_string_or_a_character():
    text = TextStream(TOK, stop=("END",))
    pushed = [text.push(t) for t in TOK.encode("ab EN")]
    assert "".join(t for t, _ in pushed) == "ab " and not any(s for _, s in pushed)
    assert text.push(TOK.encode("D")[0]) == ("", True)
    euro = TextStream(TOK, stop=())
    first, second, third = ("€".encode())
    assert [euro.push(b)[0] for b in (first, second, third)] == ["", "", "€"]   # byte tokens 0..255
    assert euro.flush() == ""


def test_context_end_finishes_with_length_and_too_long_a_prompt_is_refused(model, engine):
    block = model.cfg.block_size
    deltas = list(engine.stream(Request([1] * (block - 3), temperature=0.0)))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 4            # the last one fills position block_size - 1... and one more
    for n in (0, block):
        with pytest.raises(ValueError, match="context is 128 tokens"):
            engine.submit(Request([1] * n), lambda d: None)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        engine.submit(Request([1], max_tokens=0), lambda d: None)
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request([1], top_p=1.5), lambda d: None)


def test_a_closed_stream_frees_its_row_at_once():
    # A reply that would run to the end of a 1024-token context, closed after its first piece.
    engine = Engine(tiny_model(block_size=1024), TOK, max_batch=2)
    try:
        stream = engine.stream(Request(prompts(1)[0], temperature=1.0))
        next(stream)
        stream.close()
        deadline = time.monotonic() + 5
        while engine.load()["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert engine.stats.tokens < 500
    finally:
        engine.close()


def test_a_failing_prefill_fails_its_request_only_and_a_failing_step_its_batch(model, engine, monkeypatch):
    failing = {"prefill": False, "step": False}
    forward = type(model).forward

    def fail(self, idx, *args, **kwargs):
        kind = "prefill" if idx.shape[1] > 1 else "step"
        if failing[kind]:
            failing[kind] = False
            raise RuntimeError(f"out of memory in a {kind}")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", fail)
    running = Request(prompts(2)[1], max_tokens=40, temperature=0.0)
    seq, deltas = submit(engine, running)
    while seq.generated < 3:
        time.sleep(0.001)
    failing["prefill"] = True
    failed = list(engine.stream(Request(prompts(1)[0], max_tokens=5)))
    assert failed[-1].finish_reason == "error" and "out of memory in a prefill" in failed[-1].text
    wait([seq])
    assert deltas[-1].finish_reason == "length" and seq.text.ids == reference(model, running)

    failing["step"] = True
    failed = list(engine.stream(Request(prompts(1)[0], max_tokens=5)))
    assert failed[-1].finish_reason == "error" and "out of memory in a step" in failed[-1].text
    assert list(engine.stream(Request(prompts(1)[0], max_tokens=5)))[-1].finish_reason in ("stop", "length")


def test_close_ends_waiting_requests():
    engine = Engine(tiny_model(), TOK, max_batch=1)
    seqs = [submit(engine, Request(p, max_tokens=10_000)) for p in prompts(3)]
    engine.close()
    assert all(deltas[-1].finish_reason == "error" for _, deltas in seqs)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(Request([1]), lambda d: None)
