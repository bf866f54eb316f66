# SPDX-License-Identifier: Apache-2.0
"""The register of overrides of vLLM internals (asyncbatch.glue.overrides): each
entry is complete, the doc is in step, and a fast path runs only on the vLLM
code it was verified against."""

import pathlib

import pytest
from streams import ASYNCBATCH

from asyncbatch import _compat
from asyncbatch.glue import overrides
from asyncbatch.glue.fastoutput import HAS_VLLM_PLAIN_DECODE_OUTPUT
from asyncbatch.glue.fastpath import HAS_VLLM_STEADY_DECODE_PATH
from asyncbatch.glue.overrides import REGISTER, fast_path_verified, source_hash

ROOT = pathlib.Path(__file__).parents[2]


def test_every_entry_says_what_why_where_and_what_removes_it():
    assert len({o.name for o in REGISTER}) == len(REGISTER)
    for o in REGISTER:
        assert o.kind in ("hook", "fast path")
        assert o.replaces and o.why and o.upstream and o.verified_on, o.name
        assert set(o.verified_on) <= set(_compat.VERIFIED_RELEASES), o.name
        if o.kind == "fast path":
            assert o.shadows and set(o.verified) == set(o.verified_on), o.name
            assert all(len(h) == 16 for h in o.verified.values()), o.name
        else:
            assert not o.shadows and not o.verified, o.name


def test_the_doc_is_the_register():
    doc = (ROOT / "configs" / "overrides.md").read_text()
    assert overrides.render_markdown() in doc


def test_every_shadowed_function_exists_here():
    # in some supported releases only (the source hash counts them as missing elsewhere)
    sometimes = {
        "AsyncScheduler._update_request_with_output": "folded into Scheduler's in 0.33",
        "StructuredOutputManager.accept_tokens": "not in 0.26",
    }
    for o in REGISTER:
        for dotted in o.shadows:
            if dotted.rpartition(":")[2] in sometimes:
                continue
            assert overrides._resolve(dotted) is not None, dotted


@pytest.mark.skipif(not _compat.is_verified_release()
                    or HAS_VLLM_STEADY_DECODE_PATH or HAS_VLLM_PLAIN_DECODE_OUTPUT,
                    reason="not a verified vLLM release, or a vLLM with patches/ applied")
def test_recorded_hashes_match_this_release():
    version = _compat.release(_compat.installed_vllm_version())
    for o in REGISTER:
        if version in o.verified:
            assert source_hash(o.shadows) == o.verified[version], o.name


@pytest.mark.skipif(HAS_VLLM_STEADY_DECODE_PATH or not _compat.is_verified_release(),
                    reason="vLLM with patches/0006 has its own fast path; or not a "
                           "verified release")
def test_a_fast_path_stands_down_on_code_it_was_not_verified_against(
        make_scheduler, monkeypatch, caplog):
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    stock = KVCacheManager.allocate_slots

    def allocate_slots(self, *args, **kwargs):  # a vLLM whose allocate_slots changed
        return stock(self, *args, **kwargs)

    monkeypatch.setattr(KVCacheManager, "allocate_slots", allocate_slots)
    fast_path_verified.cache_clear()
    try:
        reason = fast_path_verified("decode_fast_path")
        assert reason is not None and "not the code it was verified against" in reason
        scheduler = make_scheduler(ASYNCBATCH)
        assert scheduler.decode_fast_path is None
        assert KVCacheManager.allocate_slots is allocate_slots
    finally:
        fast_path_verified.cache_clear()


def test_an_unverified_release_runs_no_fast_path(make_scheduler, monkeypatch):
    monkeypatch.setattr(overrides, "installed_vllm_version", lambda: "0.29.0")
    fast_path_verified.cache_clear()
    try:
        assert "not verified on vLLM 0.29.0" in fast_path_verified("decode_fast_path")
        scheduler = make_scheduler(ASYNCBATCH)
        assert scheduler.decode_fast_path is None or HAS_VLLM_STEADY_DECODE_PATH
        assert scheduler.decode_fast_output is None
        assert scheduler.asyncbatch_fast_paths["decode_fast_output"].startswith(
            "vLLM's own" if HAS_VLLM_PLAIN_DECODE_OUTPUT else "off: not verified")
    finally:
        fast_path_verified.cache_clear()


@pytest.mark.parametrize("version, refused", [("0.26.0", False), ("0.33.0", False),
                                              ("0.29.1", True), ("0.33.1", True)])
def test_the_worker_runs_only_where_it_was_verified_on_a_gpu(version, refused):
    reason = overrides.worker_unverified(version)
    assert (reason is not None) is refused
    if refused:
        assert version in reason and "Drop --worker-cls asyncbatch.Worker" in reason
