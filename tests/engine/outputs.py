# SPDX-License-Identifier: Apache-2.0
"""What the CPU tests of ``update_from_output`` compare, and requests that exercise
every stop rule of vLLM's ``check_stop``."""

from asyncbatch.sim.engine import SimEngine, default_token, make_request


def output_view(o):
    # event timestamps differ between runs; their kinds must not
    return (o.request_id, list(o.new_token_ids), o.finish_reason, o.stop_reason,
            [e.type for e in o.events or ()], o.prefill_stats, o.new_logprobs,
            o.num_nans_in_logits, o.trace_headers, o.kv_transfer_params)


def state_view(scheduler):
    manager = scheduler.kv_cache_manager
    (single,) = manager.coordinator.single_type_managers
    requests = {
        rid: (r.status, r.num_computed_tokens, r.num_output_placeholders,
              r.num_in_flight_tokens, list(r.output_token_ids), list(r.block_hashes),
              r.stop_reason, manager.get_block_ids(rid),
              single.num_cached_block.get(rid, 0))
        for rid, r in scheduler.requests.items()
    }
    return (requests, [r.request_id for r in scheduler.running],
            manager.block_pool.get_num_free_blocks(),
            sorted(map(str, manager.block_pool.cached_block_hash_to_block._cache)))


def record(scheduler) -> list:
    """After every update_from_output: its outputs per client and the state."""
    steps: list = []
    update = scheduler.update_from_output

    def recording(scheduler_output, model_runner_output):
        result = update(scheduler_output, model_runner_output)
        steps.append((
            {client: ([output_view(o) for o in eco.outputs], eco.finished_requests,
                      eco.scheduler_stats is not None)
             for client, eco in result.items()},
            state_view(scheduler),
        ))
        return result

    scheduler.update_from_output = recording
    return steps


def tokens(rid, i):
    # "rep" requests repeat one token, to trigger repetition detection
    if rid.startswith("rep"):
        return 5
    # "mintok{k}" emits EOS (1) at output 2, below its min_tokens (5 + k), and at
    # its last allowed position
    if rid.startswith("mintok") and i in (2, 4 + int(rid[-1])):
        return 1
    return default_token(rid, i)


def special_requests():
    """Requests whose every stop rule check_stop knows is exercised."""
    from vllm.sampling_params import RepetitionDetectionParams

    out = []
    for i in range(4):
        prompt = [2 + (7 * i + k) % 900 for k in range(40 + 9 * i)]
        out.append(make_request(f"plain{i}", prompt, max_tokens=30 + i))
        # stops on a token of its own output (stop_token_ids, stop_reason set)
        r = make_request(f"stopid{i}", prompt, max_tokens=40,
                         stop_token_ids=[default_token(f"stopid{i}", 6 + i)])
        out.append(r)
        # emits EOS (token 1) early, but min_tokens holds it past that
        r = make_request(f"mintok{i}", prompt, max_tokens=40)
        r.sampling_params.min_tokens = 5 + i
        out.append(r)
        r = make_request(f"logprobs{i}", prompt, max_tokens=12)
        r.sampling_params.logprobs = 2
        out.append(r)
        r = make_request(f"rep{i}", prompt, max_tokens=40)
        r.sampling_params.repetition_detection = RepetitionDetectionParams(
            max_pattern_size=1, min_count=4 + i)
        out.append(r)
        # runs into max_model_len (160)
        out.append(make_request(f"long{i}", [3 + k % 500 for k in range(140 + i)],
                                max_tokens=100))
    return out


# scheduler sizes for `special_requests`: all of them at once, max_model_len 160
SPECIAL_LIMITS = {"num_blocks": 400, "max_num_seqs": 32, "max_num_batched_tokens": 512,
                  "max_model_len": 160}


def run_special_requests(scheduler):
    """Run `special_requests` with the `tokens` model to completion; the `record`
    of every step, and the engine."""
    steps = record(scheduler)
    engine = SimEngine(scheduler, token_fn=tokens)
    for request in special_requests():
        engine.add_request(request)
    engine.run()
    return steps, engine
