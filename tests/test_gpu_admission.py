"""Runners on GPUs, without one: the estimator places a real GGUF's layers on made-up devices,
and the scheduler admits, evicts and refuses by whichever device is short."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.scheduler import memory
from app.scheduler.devices import HOST, Device
from app.scheduler.errors import NoMemory
from app.scheduler.launch import default_slots, default_threads
from app.sizes import MIB
from tests.test_scheduler_unit import RUNNER, Held, Runners, make, resident, run, use
from tests.tiny_gguf import write_tiny_gguf

GIB = 2**30


def gpu(name: str = "CUDA0", total: int = 80 * GIB) -> Device:
    return Device(name, "Test GPU", total, total)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    return (write_tiny_gguf(path, layers=4, hidden=256, ffn=1024),)


def test_a_model_that_fits_goes_to_the_gpu_whole(model: tuple[Path, ...]):
    cpu = memory.estimate(model, 512, 4)
    est = memory.estimate(model, 512, 4, (gpu(),), None, {HOST: GIB, "CUDA0": GIB})
    assert est.gpu_layers == 5  # 4 layers and the output
    assert est.on("CUDA0") > 0
    # The layers' weights and KV cache moved: the host keeps the embeddings and the rest.
    assert est.on(HOST) < cpu.total
    assert est.on(HOST) > memory.RUNNER_BASE_BYTES


def test_a_model_too_big_for_the_gpu_is_split_with_the_host(model: tuple[Path, ...]):
    whole = memory.estimate(model, 512, 4, (gpu(),), None, {HOST: GIB, "CUDA0": GIB})
    budget = whole.on("CUDA0") // 2
    est = memory.estimate(model, 512, 4, (gpu(),), None, {HOST: GIB, "CUDA0": budget})
    assert 0 < est.gpu_layers < 5
    assert est.on("CUDA0") <= budget
    assert est.on(HOST) > whole.on(HOST)
    nothing = memory.estimate(model, 512, 4, (gpu(),), None, {HOST: GIB, "CUDA0": 1})
    assert nothing.gpu_layers == 0 and nothing.on("CUDA0") == 0


def test_explicit_gpu_layers_are_taken_as_given(model: tuple[Path, ...]):
    est = memory.estimate(model, 512, 4, (gpu(),), 2, {HOST: GIB, "CUDA0": 1})
    assert est.gpu_layers == 2 and est.on("CUDA0") > 1  # over its budget: admission says so


def test_two_gpus_share_the_layers_by_their_budgets(model: tuple[Path, ...]):
    gpus = (gpu("CUDA0"), gpu("CUDA1"))
    est = memory.estimate(model, 512, 4, gpus, None, {HOST: GIB, "CUDA0": GIB, "CUDA1": 3 * GIB})
    assert est.gpu_layers == 5
    assert est.on("CUDA1") == pytest.approx(3 * est.on("CUDA0"), rel=0.01)


def test_gpu_defaults_more_slots_fewer_threads():
    assert default_slots(()) == 4
    assert default_slots((gpu(total=8 * GIB),)) == 8
    assert default_slots((gpu(total=24 * GIB),)) == 12
    assert default_slots((gpu(total=141 * GIB),)) == 64
    assert default_threads((gpu(),)) <= 4


@run
async def test_a_gpu_runner_makes_room_on_the_gpu_only():
    runners = Runners()
    # Room on the host for all three; on the GPU for one 100 MiB runner.
    s = make(runners, limit=10 * RUNNER, gpus=(gpu(total=150 * MIB),), gpu_limit="100%")
    await use(s, "a@CUDA0")
    await use(s, "b")  # host only: the GPU runner stays
    assert resident(s) == {"a@CUDA0", "b"}
    await use(s, "c@CUDA0")  # short on CUDA0: a goes, b (host only) is not touched
    assert resident(s) == {"b", "c@CUDA0"}
    (a,) = runners.of("a@CUDA0")
    assert not a.alive and a.estimate.on("CUDA0") == 100 * MIB


@run
async def test_a_runner_too_big_for_the_gpu_budget_is_refused_naming_it():
    s = make(Runners(), gpus=(gpu(total=150 * MIB),), gpu_limit="50%")
    with pytest.raises(NoMemory) as refused:
        await use(s, "a@CUDA0")
    message = str(refused.value)
    assert "needs about 100 MiB on CUDA0" in message
    assert "memory limit of 75 MiB on CUDA0 (MODEL_RUNNER_GPU_MEMORY_LIMIT)" in message


@run
async def test_a_gpu_runner_with_requests_waiting_holds_its_gpu():
    s = make(Runners(), gpus=(gpu(total=150 * MIB),), gpu_limit="100%", parallel=1)
    held = Held()
    for _ in range(2):  # one in its slot, one waiting
        await held.hold(s, "a@CUDA0")
    with pytest.raises(NoMemory, match="memory limit on CUDA0 is held by runners"):
        await use(s, "b@CUDA0")
    await held.release()
