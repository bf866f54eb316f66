# SPDX-License-Identifier: Apache-2.0
"""asyncbatch's waiting queue answers every call vLLM's scheduler makes on
``Scheduler.waiting`` as vLLM's own queues do (``request_queue.py``): the
conformance suite (conformance/run.py) runs vLLM's tests over it, these pin
the parts that crashed or differed before."""

import pytest
from streams import ASYNCBATCH, settings
from vllm.v1.request import RequestStatus

from asyncbatch.sim.engine import make_request

POLICIES = pytest.mark.parametrize("policy", ["prefix", "fcfs"])


def requests(n, shared=True):
    prefix = list(range(2, 34))
    return [make_request(f"r{i}", (prefix if shared else [100 + i] * 32) + [200 + i],
                         max_tokens=4, arrival_time=float(i)) for i in range(n)]


@POLICIES
def test_remove_requests_removes_what_it_holds_and_ignores_the_rest(make_scheduler, policy):
    scheduler = make_scheduler(ASYNCBATCH, **settings(policy=policy))
    held = requests(3)
    for r in held:
        scheduler.add_request(r)
    elsewhere = make_request("elsewhere", [5, 6, 7], max_tokens=4)
    # vLLM's finish_requests passes one list to waiting and to skipped_waiting.
    scheduler.waiting.remove_requests([held[1], elsewhere])
    assert [r.request_id for r in scheduler.waiting] in (["r0", "r2"], ["r2", "r0"])
    assert len(scheduler.waiting) == 2 and held[1] not in scheduler.waiting
    with pytest.raises(ValueError):
        scheduler.waiting.remove_request(elsewhere)


@POLICIES
def test_the_queue_is_indexable_in_admission_order(make_scheduler, policy):
    scheduler = make_scheduler(ASYNCBATCH, **settings(policy=policy))
    for r in requests(4, shared=False):
        scheduler.add_request(r)
    queue = scheduler.waiting
    assert queue[0] is queue.peek_request()
    assert [r.request_id for r in queue[:]] == [r.request_id for r in queue]
    assert queue[-1] is list(queue)[-1]


@POLICIES
def test_adding_a_held_request_again_keeps_one_copy_in_place(make_scheduler, policy):
    """vLLM's deque would hold two copies and its next ``remove_requests`` drops
    both (a streaming session that ends an input chunk while preempted); the
    policy queue keeps one, in place, and the same removal drops it."""
    scheduler = make_scheduler(ASYNCBATCH, **settings(policy=policy))
    held = requests(3, shared=False)
    for r in held:
        scheduler.add_request(r)
    before = [r.request_id for r in scheduler.waiting]
    scheduler.waiting.add_request(held[0])
    assert [r.request_id for r in scheduler.waiting] == before
    scheduler.waiting.remove_requests([held[0]])
    assert held[0] not in scheduler.waiting and len(scheduler.waiting) == 2


def test_a_scheduler_built_without_init_behaves_as_vllms():
    """vLLM's own tests build schedulers with ``object.__new__`` and set only what
    they use: the plugin's own state has class-level defaults."""
    import asyncbatch

    scheduler = object.__new__(asyncbatch.Scheduler)
    assert scheduler.decode_fast_output is None and scheduler.decode_fast_path is None
    assert scheduler.prefix_policy is None and scheduler.pipeline_depth == 2
    scheduler.on_request_finished(make_request("x", [5, 6], max_tokens=2))


def test_a_step_left_open_by_a_raising_schedule_is_closed_at_the_next(make_scheduler):
    """vLLM with patches/0001 calls begin_step and end_step without a try/finally: a
    schedule() that raised leaves the policy's step open, and the next begin_step
    must close it before it opens its own (the gate must not carry over)."""
    s = make_scheduler(ASYNCBATCH)
    queue = s.waiting
    for i in range(3):
        s.add_request(make_request(f"r{i}", list(range(2, 40)), max_tokens=4))
    queue.begin_step(s)
    assert queue.step_open and queue.gated
    for request in list(queue):  # the step raised; its requests were aborted meanwhile
        s.finish_requests(request.request_id, RequestStatus.FINISHED_ABORTED)
    assert len(queue) == 0
    queue.begin_step(s)  # nothing waits now: no step opens, and the old one is closed
    assert not queue.step_open and not queue.gated and queue.may_admit()
    assert s.prefix_policy._state is None
