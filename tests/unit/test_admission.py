"""The serving admission arithmetic, without a server: the pixel budget and the deadline estimate."""

from __future__ import annotations

import asyncio

import pytest

from d2ops.serving.admission import Admission, NeverFits
from d2ops.serving.core import MicroBatcher, Overloaded


def test_a_request_over_the_whole_budget_never_fits() -> None:
    admission = Admission(max_pixels=100, seconds_per_image=lambda: 0.0)
    with pytest.raises(NeverFits, match="--max-pixels-in-flight"):
        admission.admit([60, 41], seconds_left=30)
    assert (admission.pixels, admission.images) == (0, 0), "a refusal charges nothing"


def test_the_budget_is_shared_by_requests_in_flight_until_released() -> None:
    admission = Admission(max_pixels=100, seconds_per_image=lambda: 0.5)
    first = admission.admit([40, 30], seconds_left=30)
    assert (admission.pixels, admission.images) == (70, 2)
    with pytest.raises(Overloaded, match="--max-pixels-in-flight") as refused:
        admission.admit([31], seconds_left=30)
    assert refused.value.retry_after == 1, "two images in flight at 0.5 s each"
    second = admission.admit([30], seconds_left=30)  # exactly fills the budget
    admission.release(first)
    admission.release(second)
    assert (admission.pixels, admission.images) == (0, 0)
    admission.admit([100], seconds_left=30)


def test_work_that_would_miss_its_deadline_is_refused_with_the_estimated_wait() -> None:
    seconds = [0.25]
    admission = Admission(max_pixels=10**9, seconds_per_image=lambda: seconds[0], headroom=1.0)
    ahead = [admission.admit([1] * 4, seconds_left=30) for _ in range(4)]  # 16 images, 4 s of work
    admission.admit([1], seconds_left=4.25)  # 17 images x 0.25 s = 4.25 s: just in time
    with pytest.raises(Overloaded, match="images ahead") as refused:
        admission.admit([1], seconds_left=4.25)  # 18 x 0.25 = 4.5 s
    assert refused.value.retry_after == 5, "the 17 images in flight take 4.25 s"
    seconds[0] = 0.1  # the model got faster: the estimate follows the measurement
    admission.admit([1], seconds_left=4.25)
    for ticket in ahead:
        admission.release(ticket)
    assert admission.images == 2


def test_headroom_keeps_admitted_work_inside_the_deadline() -> None:
    admission = Admission(max_pixels=10**9, seconds_per_image=lambda: 1.0, headroom=0.5)
    admission.admit([1], seconds_left=30)
    admission.admit([1], seconds_left=4.0)  # 2 s of work, half of the 4 s left
    with pytest.raises(Overloaded):
        admission.admit([1], seconds_left=4.0)  # 3 s: inside the deadline, not inside the headroom


def test_a_lone_request_and_an_unmeasured_model_are_only_bounded_by_pixels() -> None:
    slow = Admission(max_pixels=10**9, seconds_per_image=lambda: 60.0)
    slow.admit([1] * 16, seconds_left=30)  # nothing ahead: waiting could not make it faster
    cold = Admission(max_pixels=100, seconds_per_image=lambda: 0.0)
    for _ in range(10):
        cold.admit([10], seconds_left=0.001)  # no batch measured yet: no time estimate
    with pytest.raises(Overloaded):
        cold.admit([1], seconds_left=30)


@pytest.mark.parametrize("kwargs", [{"max_pixels": 0}, {"max_pixels": 10, "headroom": 0.0}])
def test_bad_arguments_say_what_is_allowed(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Admission(seconds_per_image=lambda: 0.0, **kwargs)  # type: ignore[arg-type]


def test_the_batcher_measures_seconds_per_image() -> None:
    """What admission's estimate reads: a batch's seconds over its size, not the batch's seconds; the median of
    the last few, so one slow batch (the first after a load) does not skew it."""

    def run_batch(images: list[int], thresholds: list[float]) -> list[int]:
        return [sum(range(20_000)) + i for i in images]

    async def main() -> MicroBatcher:
        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait_s=1.0, expected_arrivals=lambda: 4)
        await batcher.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            await asyncio.gather(*(batcher.submit([i], [0.5], deadline) for i in range(4)))
        finally:
            await batcher.stop()
        return batcher

    stats = asyncio.run(main()).stats
    assert stats.sizes == [4]
    assert stats.seconds_per_image == pytest.approx(stats.ewma_batch_seconds / 4)
    assert stats.seconds_per_image > 0
    stats.image_seconds = [5.0, 0.1, 0.2, 0.1, 0.1]
    assert stats.seconds_per_image == pytest.approx(0.1)
