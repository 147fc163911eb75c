"""/metrics: a Prometheus text parser reads it, and its counters move with the requests, the
runners' own figures (labelled backend, model, mode) included; plus its parts on their own."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from app.api.middleware import Handler, final_status, settle_status
from app.api.responses import answer_sent, client_left
from app.engine.engine import Failed, Finished
from app.runner.metrics import RunnerMetrics, Watch
from app.scheduler.launch import COMPLETION, EMBEDDING
from app.scheduler.observer import FOR_MEMORY, KEEP_ALIVE
from app.service import exposition
from app.service.metrics import Metrics, PullMetrics, SchedulerMetrics
from app.settings import Settings, SettingsError
from tests.conftest import Server, new_server
from tests.registry import LocalRegistry
from tests.test_distribution import pull, push_tiny
from tests.test_inference import start_server
from tests.test_scheduler_unit import RUNNER, Runners, Timers, make, run, settle, use

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHAT_ROUTE = "/engines/{backend}/v1/chat/completions"


def scrape(server: Server, path: str = "/metrics") -> list[Metric]:
    reply = server.tcp.request("GET", path)
    assert reply.status == 200, reply.text
    assert reply.headers["Content-Type"] == CONTENT_TYPE
    text = reply.body.decode()
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert [n for n, k in Counter(typed).items() if k > 1] == []  # each family once
    return list(text_string_to_metric_families(text))


def value(families: list[Metric], sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels``."""
    return sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


def samples(families: list[Metric], sample: str) -> list[dict[str, str]]:
    return [s.labels for f in families for s in f.samples if s.name == sample]


# -- end to end, on a tiny model -----------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("metrics"), tiny_gguf)
    yield srv
    srv.stop()


def test_requests_tokens_and_runners_are_counted(llm: Server):
    client = openai.OpenAI(base_url=f"{llm.url}/engines/llama.cpp/v1", api_key="unused")
    model = client.models.list().data[0].id
    llm.tcp.checked("POST", "/engines/unload", json.dumps({"all": True}).encode())
    before = scrape(llm)
    messages: Any = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="ai/tiny",  # another spelling of the same model: the same labels
            messages=messages,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = chunks[-1].usage
    assert streamed is not None
    comp = openai.OpenAI(base_url=f"{llm.url}/v1", api_key="unused").completions.create(
        model="tiny", prompt="the model", max_tokens=4, temperature=0
    )
    emb = client.embeddings.create(model="tiny", input=["hello world", "the test"])
    after = scrape(llm)

    def moved(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    requests = "model_runner_requests_total"
    assert moved(requests, route=CHAT_ROUTE, method="POST", model=model, status="200") == 2
    assert moved(requests, route="/v1/completions", model=model, status="200") == 1
    assert moved(requests, route="/engines/{backend}/v1/embeddings", model=model) == 1

    generation = {"backend": "llama.cpp", "model": model, "mode": COMPLETION}
    usages = [chat.usage, streamed, comp.usage]
    assert all(u is not None for u in usages)
    prompt = sum(u.prompt_tokens for u in usages if u)
    completion = sum(u.completion_tokens for u in usages if u)
    assert prompt > 0 and completion > 0
    assert moved("model_runner_runner_prompt_tokens_total", **generation) == prompt
    assert moved("model_runner_runner_completion_tokens_total", **generation) == completion
    chat_end = chat.choices[0].finish_reason
    assert moved("model_runner_runner_requests_total", kind="chat", outcome=chat_end) == 2
    comp_end = comp.choices[0].finish_reason
    assert moved("model_runner_runner_requests_total", kind="completion", outcome=comp_end) == 1
    assert moved("model_runner_runner_time_to_first_token_seconds_count", **generation) == 3
    gaps = sum(1 for u in usages if u and u.completion_tokens > 1)  # one token has no gap
    assert moved("model_runner_runner_inter_token_latency_seconds_count", **generation) == gaps
    embedding = {"backend": "llama.cpp", "model": model, "mode": EMBEDDING}
    assert moved("model_runner_runner_prompt_tokens_total", **embedding) == emb.usage.prompt_tokens
    assert moved("model_runner_runner_requests_total", kind="embedding", **embedding) == 1
    # Every runner sample says whose it is.
    runner_samples = [
        s.labels for f in after if f.name.startswith("model_runner_runner_") for s in f.samples
    ]
    assert runner_samples
    assert {(s["backend"], s["model"], s["mode"]) for s in runner_samples} == {
        ("llama.cpp", model, COMPLETION),
        ("llama.cpp", model, EMBEDDING),
    }

    # The scheduler's side: what /engines/ps shows, and the loads that got there.
    ps = json.loads(llm.tcp.checked("GET", "/engines/ps").body)
    assert value(after, "model_runner_runners", mode=COMPLETION, state="loaded") == 1
    assert value(after, "model_runner_runners", mode=EMBEDDING, state="loaded") == 1
    assert moved("model_runner_loads_total", mode=COMPLETION) == 1
    assert moved("model_runner_load_duration_seconds_count", mode=EMBEDDING) == 1
    for row in ps:
        for device, size in row["memory_by_device"].items():
            labels = {"model": model, "mode": row["mode"], "device": device}
            assert value(after, "model_runner_memory_estimate_bytes", **labels) == size > 0
        if row["mode"] == COMPLETION:
            slots = value(after, "model_runner_runner_slots", mode=COMPLETION)
            assert slots == row["parallel"]
            assert value(after, "model_runner_runner_slots_in_use", mode=COMPLETION) == 0


def test_errors_are_counted_with_their_status(llm: Server):
    before = scrape(llm)
    body = json.dumps({"model": "no/such-model", "messages": []}).encode()
    assert llm.tcp.request("POST", "/engines/llama.cpp/v1/chat/completions", body).status == 404
    assert llm.tcp.request("GET", "/no/such/route").status == 404
    after = scrape(llm)

    def moved(**labels: str) -> float:
        name = "model_runner_requests_total"
        return value(after, name, **labels) - value(before, name, **labels)

    # The model never resolved: no label for a name nobody has (they are endless).
    assert moved(route=CHAT_ROUTE, method="POST", model="", status="404") == 1
    assert moved(route="unmatched", method="", status="404") == 1
    assert moved(route="/metrics", method="GET", status="200") == 1  # the first scrape


def test_a_client_leaving_mid_stream_is_499_and_one_reading_to_done_is_200(llm: Server):
    client = openai.OpenAI(base_url=f"{llm.url}/engines/llama.cpp/v1", api_key="unused")
    model = client.models.list().data[0].id
    messages: Any = [{"role": "user", "content": "Talk for ever"}]
    before = scrape(llm)
    # The SDK hangs up on [DONE], before the chunked end: an answer all sent is still a 200.
    for _ in range(3):
        list(
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=8, stream=True
            )
        )
    with client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20_000, stream=True
    ) as stream:
        next(iter(stream))
    llm.wait_logged("status=499")  # the front notices on its own schedule
    after = scrape(llm)

    def moved(status: str) -> float:
        labels = {"route": CHAT_ROUTE, "model": model, "status": status}
        name = "model_runner_requests_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert (moved("200"), moved("499")) == (3, 1)


def test_only_get_and_only_allowed_origins(llm: Server):
    reply = llm.tcp.request("POST", "/metrics")
    assert reply.status == 405 and "GET" in reply.headers["Allow"]
    assert scrape(llm, "/exp/vDD4.40/metrics")
    hostile = llm.tcp.request("GET", "/metrics", headers={"Origin": "http://evil.example"})
    assert hostile.status == 403


def test_disable_metrics_removes_the_route(tmp_path: Path):
    srv = new_server(tmp_path, DISABLE_METRICS="1")
    srv.start()
    try:
        assert srv.tcp.request("GET", "/metrics").status == 404
        assert srv.tcp.request("GET", "/version").status == 200
    finally:
        srv.stop()


def test_disable_metrics_is_a_flag():
    assert Settings.from_env({"DISABLE_METRICS": "1"}).disable_metrics
    assert Settings.from_env({"DISABLE_METRICS": "true"}).disable_metrics
    assert not Settings.from_env({"DISABLE_METRICS": "0"}).disable_metrics
    assert not Settings.from_env({}).disable_metrics
    with pytest.raises(SettingsError, match="DISABLE_METRICS='maybe'"):
        Settings.from_env({"DISABLE_METRICS": "maybe"})


def test_pulls_count_their_bytes(server: Server, registry: LocalRegistry, tiny_gguf: Path):
    ref = push_tiny(server, tiny_gguf, f"{registry.host}/org/tiny:v1")
    before = scrape(server)
    status, lines, _ = pull(server, ref)
    assert status == 200, lines
    again, _, _ = pull(server, ref)
    assert again == 200
    after = scrape(server)
    layers = max(line["total"] for line in lines)
    assert layers > 0
    assert (
        value(after, "model_runner_pull_bytes_total")
        - value(before, "model_runner_pull_bytes_total")
        == layers
    )
    duration = "model_runner_pull_duration_seconds_count"
    assert value(after, duration, outcome="success") == 1
    assert value(after, duration, outcome="cached") == 1


# -- the parts -----------------------------------------------------------------------------
RUNNER_TEXT = """# HELP t_tokens_total Tokens, "quoted" \\\\ and all
# TYPE t_tokens_total counter
t_tokens_total{kind="chat"} 3.0
# HELP t_busy Busy slots
# TYPE t_busy gauge
t_busy 1.0
"""


def test_runner_texts_are_labelled_and_merged_by_family():
    front = list(text_string_to_metric_families("# TYPE f_up gauge\nf_up 1\n"))
    a = exposition.labelled(RUNNER_TEXT, {"model": 'a"b\nc', "mode": "completion"})
    b = exposition.labelled(RUNNER_TEXT, {"model": "other", "mode": "completion"})
    twin = exposition.labelled(RUNNER_TEXT, {"model": "other", "mode": "completion"})
    clash = list(text_string_to_metric_families("# TYPE t_busy_total counter\nt_busy_total 9\n"))
    text = exposition.render(exposition.merged([*front, *a, *b, *twin, *clash])).decode()
    assert text.count("# TYPE t_tokens_total counter") == 1
    parsed = list(text_string_to_metric_families(text))
    assert [f.name for f in parsed] == ["f_up", "t_tokens", "t_busy"]
    tokens = {s.labels["model"]: s.value for s in parsed[1].samples}
    assert tokens == {'a"b\nc': 3, "other": 6}  # the two with the same labels add up
    busy = {s.labels["model"]: s.value for s in parsed[2].samples}
    assert parsed[2].type == "gauge" and busy == {'a"b\nc': 1, "other": 2}  # no clash
    assert parsed[1].documentation == 'Tokens, "quoted" \\ and all'
    assert {s.labels["kind"] for s in parsed[1].samples} == {"chat"}  # its own labels stay
    with pytest.raises(ValueError):
        exposition.labelled("garbage here\n", {"model": "m"})


def test_unreadable_or_silent_runners_are_left_out():
    @run
    async def check() -> None:
        runners = Runners()
        s = make(runners)
        await use(s, "a")
        await use(s, "b")
        await use(s, "c")
        a, b, c = runners.started

        def says(text: str | None) -> Any:
            async def metrics(timeout: float) -> str | None:
                return text

            return metrics

        a.metrics = says(RUNNER_TEXT)  # type: ignore[method-assign]
        b.metrics = says("garbage here\n")  # type: ignore[method-assign]
        c.metrics = says(None)  # type: ignore[method-assign]
        families = list(text_string_to_metric_families((await Metrics().exposition(s)).decode()))
        assert {lb["model"] for lb in samples(families, "t_tokens_total")} == {"a"}
        assert value(families, "model_runner_runners", mode=COMPLETION, state="loaded") == 3
        assert value(families, "model_runner_memory_estimate_bytes", model="c") == RUNNER
        await s.close()

    check()


def test_the_scheduler_reports_loads_failures_and_evictions():
    @run
    async def check() -> None:
        registry = CollectorRegistry()
        runners, timers = Runners(), Timers()
        s = make(runners, limit=RUNNER, timers=timers, observer=SchedulerMetrics(registry))

        def get(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        await use(s, "a")
        await use(s, "b")  # only one fits: a goes
        assert get("model_runner_loads_total", mode=COMPLETION) == 2
        assert get("model_runner_load_duration_seconds_count", mode=COMPLETION) == 2
        assert get("model_runner_evictions_total", mode=COMPLETION, reason=FOR_MEMORY) == 1
        await timers.fire()  # b idle past its keep_alive
        assert get("model_runner_evictions_total", mode=COMPLETION, reason=KEEP_ALIVE) == 1
        runners.fail_with = "bad model"
        with pytest.raises(Exception, match="bad model"):
            await use(s, "c", EMBEDDING)
        assert get("model_runner_load_failures_total", mode=EMBEDDING) == 1
        assert get("model_runner_loads_total", mode=EMBEDDING) is None
        await settle()
        await s.close()

    check()


def test_a_runner_observes_each_request_once_at_its_end():
    m = RunnerMetrics()

    def get(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    watch = Watch("chat", arrived=10.0)
    watch.end = Finished("length", 7, completion_tokens=5, cached_tokens=2, first_token_at=10.5)
    watch.ended = 11.5
    m.generation_over(watch)
    assert get("model_runner_runner_requests_total", kind="chat", outcome="length") == 1
    assert get("model_runner_runner_prompt_tokens_total", kind="chat") == 7
    assert get("model_runner_runner_cached_prompt_tokens_total", kind="chat") == 2
    assert get("model_runner_runner_completion_tokens_total", kind="chat") == 5
    assert get("model_runner_runner_time_to_first_token_seconds_sum", kind="chat") == 0.5
    assert get("model_runner_runner_inter_token_latency_seconds_sum", kind="chat") == 0.25
    assert get("model_runner_runner_request_duration_seconds_sum", kind="chat") == 1.5

    m.generation_over(Watch("completion"))  # the client left before it ended
    failed = Watch("completion")
    failed.saw_end(Failed("boom"))
    m.generation_over(failed)
    assert get("model_runner_runner_requests_total", kind="completion", outcome="cancelled") == 1
    assert get("model_runner_runner_requests_total", kind="completion", outcome="failed") == 1
    assert get("model_runner_runner_prompt_tokens_total", kind="completion") is None
    m.embedded(9, 0.1)
    assert get("model_runner_runner_prompt_tokens_total", kind="embedding") == 9


def test_the_status_a_request_ends_with():
    """What the access log and the metrics say, however the handler learnt the client left."""

    async def ends(handler: Handler) -> int:
        request = make_mocked_request("GET", "/x")
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await settle_status(request, handler)
        return final_status(request)

    async def answered(request: web.Request) -> web.StreamResponse:
        return web.Response(status=201)

    async def write_failed(request: web.Request) -> web.StreamResponse:
        client_left(request)
        return web.StreamResponse()

    async def cancelled_mid_answer(request: web.Request) -> web.StreamResponse:
        raise asyncio.CancelledError

    async def cancelled_after_the_end(request: web.Request) -> web.StreamResponse:
        answer_sent(request, web.StreamResponse(status=200))
        raise asyncio.CancelledError

    async def refused(request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound()

    async def broken(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a bug")

    handlers = [answered, write_failed, cancelled_mid_answer, cancelled_after_the_end, refused]
    statuses = [asyncio.run(ends(h)) for h in [*handlers, broken]]
    assert statuses == [201, 499, 499, 200, 404, 500]


def test_pull_durations_by_outcome():
    registry = CollectorRegistry()
    pulls = PullMetrics(registry)

    async def lines(fail: bool) -> AsyncIterator[int]:
        yield 1
        yield 2
        if fail:
            raise RuntimeError("registry gone")

    async def check() -> None:
        assert [x async for x in pulls.timed(lines(False), cached=False)] == [1, 2]
        with pytest.raises(RuntimeError):
            _ = [x async for x in pulls.timed(lines(True), cached=False)]
        stream = pulls.timed(lines(False), cached=False)
        assert await anext(stream) == 1
        await stream.aclose()  # the client left mid-pull
        assert [x async for x in pulls.timed(lines(False), cached=True)] == [1, 2]

    asyncio.run(check())
    for outcome in ("success", "failed", "cancelled", "cached"):
        count = registry.get_sample_value(
            "model_runner_pull_duration_seconds_count", {"outcome": outcome}
        )
        assert count == 1, outcome
