"""The official `openai` Python client against an engine directly and through a sluice gateway
(run by tests/engines.rs). Exits non-zero, with the failed assertion, on any difference the
gateway should not make.

usage: engine_client.py GATEWAY_URL ENGINE_URL MODEL SCENARIO

Scenarios:
  compare   unary and streamed chat and completions, with and without logprobs, greedy:
            every field the engine returns directly comes back through the gateway, equal
            (except per-request values: ids, timestamps, timings, prompt-cache counts).
  compare_logprobs  the same, and the engine's logprobs must be there.
  compare_unary     the unary half of compare.
  compare_responses the Responses API, unary and streamed.
  overload  a hard-cliff policy: a measured request, then 429 with Retry-After, then admitted
            again once the average has decayed.
"""

import json
import sys
import concurrent.futures
import threading
import time

import openai
from openai import OpenAI

gateway, engine, model, scenario = sys.argv[1:5]
through = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=120)
direct = OpenAI(base_url=engine + "/v1", api_key="unused", max_retries=0, timeout=120)
MESSAGES = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "seed": 1}

# Values that differ between any two requests, whatever relays them.
PER_REQUEST = {"id", "created", "created_at", "item_id", "timings", "cached_tokens"}
# Fields an engine puts in its unary answer but not in the streamed one, so an answer
# assembled from the stream cannot have them: llama-server's Responses API sets `completed_at`
# only on unary responses. Tolerated only as missing through the gateway.
UNARY_ONLY = {"completed_at"}


def shape(v, path="$"):
    """The comparable view of a response: per-request values masked, key sets kept."""
    if isinstance(v, dict):
        return {k: ("<per-request>" if k in PER_REQUEST else shape(x, f"{path}.{k}")) for k, x in v.items()}
    if isinstance(v, list):
        return [shape(x, f"{path}[]") for x in v]
    return v


def diff(a, b, path="$"):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in a and k not in b and k in UNARY_ONLY:
                print(f"note: {path}.{k} is only in the engine's unary answer, not in its stream")
                continue
            if k not in a or k not in b:
                return f"{path}.{k}: only {'direct' if k in a else 'through the gateway'}"
            d = diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items direct, {len(b)} through the gateway"
        for i, (x, y) in enumerate(zip(a, b)):
            d = diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {json.dumps(a)[:200]} direct, {json.dumps(b)[:200]} through the gateway"


def same(kind, make):
    a = make(direct).model_dump(exclude_unset=True)
    b = make(through).model_dump(exclude_unset=True)
    d = diff(shape(a), shape(b))
    assert d is None, f"{kind}: {d}"
    print(f"{kind}: equal ({len(json.dumps(a))} bytes)")
    return a


def streamed(client, create):
    chunks = [c.model_dump(exclude_unset=True) for c in create(client)]
    text, finish, usage, roles = "", None, None, set()
    for c in chunks:
        for ch in c.get("choices") or []:
            delta = ch.get("delta") or {}
            text += delta.get("content") or ch.get("text") or ""
            roles.add(delta.get("role"))
            finish = ch.get("finish_reason") or finish
        usage = c.get("usage") or usage
    return {"text": text, "finish_reason": finish, "usage": shape(usage), "roles": sorted(r for r in roles if r)}


def chat(c, **kw):
    return c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, **GREEDY, **kw)


def text(c, **kw):
    return c.completions.create(model=model, prompt="The sky is", max_tokens=12, **GREEDY, **kw)


def compare_unary(logprobs_expected=False):
    a = same("chat, unary", chat)
    assert a["usage"]["completion_tokens"] > 0, a
    assert a["choices"][0]["finish_reason"] in ("length", "stop"), a
    a = same("chat, unary, logprobs", lambda c: chat(c, logprobs=True, top_logprobs=2))
    if logprobs_expected:
        assert a["choices"][0]["logprobs"]["content"], a
    a = same("completions, unary", text)
    assert a["usage"]["completion_tokens"] > 0, a
    a = same("completions, unary, logprobs", lambda c: text(c, logprobs=2))
    if logprobs_expected:
        assert a["choices"][0]["logprobs"], a


def compare_streamed():
    for kind, create in [
        ("chat, streamed", lambda c: chat(c, stream=True, stream_options={"include_usage": True})),
        ("completions, streamed", lambda c: text(c, stream=True, stream_options={"include_usage": True})),
    ]:
        x, y = streamed(direct, create), streamed(through, create)
        assert x == y, f"{kind}: {x} direct, {y} through the gateway"
        assert x["text"] and x["usage"], x
        print(f"{kind}: equal")


def compare():
    compare_unary()
    compare_streamed()


def compare_responses():
    """The Responses API: unary and streamed, directly and through the gateway."""
    create = lambda c, **kw: c.responses.create(model=model, input="Name three colours.", max_output_tokens=8, temperature=0, **kw)
    a = same("responses, unary", create)
    assert a["output"][0]["content"][0]["text"] and a["usage"]["output_tokens"] > 0, a

    def events(client):
        out, final = [], None
        for e in create(client, stream=True):
            out.append(e.type)
            if e.type in ("response.completed", "response.incomplete"):
                final = e.response.model_dump(exclude_unset=True)
        return sorted(set(out)), shape(final)

    x, y = events(direct), events(through)
    assert x == y, f"responses, streamed: {x} direct, {y} through the gateway"
    assert "response.output_text.delta" in x[0], x
    print("responses, streamed: equal")


def compare_logprobs():
    """`compare`, for an engine that returns logprobs (they must survive assembly)."""
    compare_unary(logprobs_expected=True)
    compare_streamed()


def overload():
    # The policy is a hard cliff at 1 ms TTFT. Eight streams keep the engine's four slots busy
    # (nothing is shed while nothing is in flight); once one of them has its first token, a
    # new request is shed.
    first_token = threading.Event()

    def busy():
        try:
            stream = through.chat.completions.create(model=model, messages=MESSAGES, max_tokens=48, stream=True)
        except openai.RateLimitError:
            return False  # the first is always admitted; later ones may meet its latency
        for _ in stream:
            first_token.set()
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(busy) for _ in range(8)]
        assert first_token.wait(60), "no first token from the engine within 60 s"
        try:
            through.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
            raise AssertionError("expected a 429")
        except openai.RateLimitError as e:
            assert e.body["code"] == "rate_limit_exceeded", e.body
            wait = float(e.response.headers["retry-after-ms"]) / 1000
            assert 0.1 <= wait <= 60 and int(e.response.headers["retry-after"]) >= 1, e.response.headers
        assert any([r.result() for r in running])
    # The SDK honours retry-after-ms: with retries the gate has reopened when it asks again
    # (here at once: the engine is idle again, nothing is in flight).
    t0 = time.monotonic()
    r = through.with_options(max_retries=4).chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert r.choices[0].message.content is not None, r
    print(f"overload: shed with Retry-After {wait:.2f} s, admitted again after {time.monotonic() - t0:.2f} s")


SCENARIOS = {
    "compare": compare,
    "compare_logprobs": compare_logprobs,
    "compare_unary": compare_unary,
    "compare_responses": compare_responses,
    "overload": overload,
}
SCENARIOS[scenario]()
