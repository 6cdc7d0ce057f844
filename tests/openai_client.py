"""The official `openai` Python client against a sluice gateway (run by tests/openai_sdk.rs).

usage: openai_client.py BASE_URL SCENARIO
Exits non-zero (with the failed assertion) when the gateway does not behave as an
OpenAI-compatible server should.
"""

import sys
import threading
import time

import json
import urllib.error
import urllib.request
import openai
from openai import OpenAI

base, scenario = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="test-key", max_retries=0, timeout=30)
MESSAGES = [{"role": "user", "content": "Say something about latency."}]


def chat_streaming():
    chunks = list(client.chat.completions.create(model="sim-llm", messages=MESSAGES, max_tokens=6, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    assert len(text.split()) >= 1, text
    assert chunks[-1].choices[0].finish_reason == "length", chunks[-1]


def chat_unary():
    r = client.chat.completions.create(model="sim-llm", messages=MESSAGES, max_tokens=5)
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content, r
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5, r.usage


def completions():
    r = client.completions.create(model="sim-llm", prompt="Once upon a time", max_tokens=4)
    assert r.object == "text_completion", r
    assert r.choices[0].text, r
    assert r.usage.completion_tokens == 4
    s = list(client.completions.create(model="sim-llm", prompt="Once", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices), s


def models():
    ids = [m.id for m in client.models.list()]
    assert ids == ["sim-llm"], ids


def rate_limited():
    # A long stream keeps the engine busy (with nothing in flight nothing is shed); its first
    # token is measured against a 1 ms TTFT threshold (hard cliff): the next request is shed.
    first_token = threading.Event()

    def busy():
        for _ in client.chat.completions.create(model="sim-llm", messages=MESSAGES, max_tokens=600, stream=True):
            first_token.set()

    background = threading.Thread(target=busy, daemon=True)
    background.start()
    assert first_token.wait(20), "no first token"
    try:
        client.chat.completions.create(model="sim-llm", messages=MESSAGES, max_tokens=1)
        raise AssertionError("expected a 429")
    except openai.RateLimitError as e:
        assert e.status_code == 429
        wait_ms = float(e.response.headers["retry-after-ms"])
        assert int(e.response.headers["retry-after"]) >= 1
        assert e.body["code"] == "rate_limit_exceeded", e.body
    # With retries, the SDK honours retry-after-ms and the retry is admitted.
    body = json.dumps({"model": "sim-llm", "messages": MESSAGES, "max_tokens": 1}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"content-type": "application/json"})
    try:
        urllib.request.urlopen(req)
        raise AssertionError("expected a 429")
    except urllib.error.HTTPError as e:
        assert e.code == 429, e
        wait_ms = float(e.headers["retry-after-ms"])
    retrying = client.with_options(max_retries=3)
    t0 = time.monotonic()
    r = retrying.chat.completions.create(model="sim-llm", messages=MESSAGES, max_tokens=1)
    waited = (time.monotonic() - t0) * 1000
    assert r.choices[0].message.content, r
    # The SDK slept about retry-after-ms (the draws' jitter differs by at most 20%).
    assert waited >= 0.7 * wait_ms, (waited, wait_ms)
    assert waited <= 1.5 * wait_ms + 2000, (waited, wait_ms)
    print(f"retry-after-ms {wait_ms:.0f}, SDK waited {waited:.0f} ms")
    background.join(30)


def over_budget():
    # The anonymous tenant may make 2 requests and use 600 tokens a minute (10 a second):
    # OpenAI's headers count them down (the tokens after the answer's usage was settled).
    usage_total = 0
    for left in ["1", "0"]:
        raw = client.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES, max_tokens=1)
        assert raw.headers["x-ratelimit-limit-requests"] == "2", dict(raw.headers)
        assert raw.headers["x-ratelimit-remaining-requests"] == left, dict(raw.headers)
        assert raw.headers["x-ratelimit-limit-tokens"] == "600", dict(raw.headers)
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 600, dict(raw.headers)
        answer = raw.parse()
        assert answer.choices[0].message.content
        usage_total += answer.usage.total_tokens
    print(f"usage_total={usage_total}")
    try:
        client.chat.completions.create(model="sim-llm", messages=MESSAGES, max_tokens=1)
        raise AssertionError("expected a 429")
    except openai.RateLimitError as e:
        h = e.response.headers
        assert h["x-ratelimit-remaining-requests"] == "0", dict(h)
        assert h["x-ratelimit-reset-requests"].endswith("s"), dict(h)
        # Two used this minute: one more fits half way into the next (90 s), when they weigh
        # one; the SDK would wait that long before retrying.
        assert 89000 <= float(h["retry-after-ms"]) <= 90000, dict(h)
        assert e.body["type"] == "requests" and e.body["code"] == "rate_limit_exceeded", e.body


{"chat_streaming": chat_streaming, "chat_unary": chat_unary, "completions": completions,
 "models": models, "rate_limited": rate_limited, "over_budget": over_budget}[scenario]()
print(f"{scenario}: ok")
