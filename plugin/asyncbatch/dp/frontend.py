# SPDX-License-Identifier: Apache-2.0
"""The front-end hook: vLLM's data-parallel client routes by prefix key.

With ``vllm serve --data-parallel-size N`` (internal load balancing, mp or Ray
backend, one or more nodes), each API server process holds a
``DPLBAsyncMPClient`` whose ``get_core_engine_for_request`` picks the engine of
each request by load alone.  `install` (called by ``asyncbatch.register``, the
``vllm.general_plugins`` entry point, in every vLLM process) wraps that method,
without importing vLLM: if vLLM's ``core_client`` module is imported already it
is patched now, else an import hook patches it when it is imported.  Processes
that never import it (EngineCore, workers) are not touched.

For each request the wrapper asks, once per client, whether routing is on
(`decide`): ``dp_routing`` "off" = never; "prefix" = always; "auto" (default) =
when the engines run ``asyncbatch.Scheduler``.  When it is on and the request
names no rank (``data_parallel_rank`` / HTTP ``X-data-parallel-rank``), is not
a pooling request, is not a chunk of an open streaming-input session and has a
prompt of at least one whole KV block, the rank is
`asyncbatch.dp.routing.rank_for` of its prefix key and the client's load view
(and, for the key share, the client's own count of that key's requests in
flight per engine: `KeyLedger`); vLLM's own method then records the choice
(abort routing, in-flight counts) as for a request that named that rank, and
the load view gets the same local increment vLLM's balancer gives it.  Every
other request goes through vLLM's method unchanged.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from asyncbatch.dp.routing import (
    DEFAULT_KEY_SHARE,
    DEFAULT_NEW_KEY_SLACK,
    key_length,
    prefix_key,
    rank_for,
)

TARGET_MODULE = "vllm.v1.engine.core_client"
TARGET_CLASS = "DPLBAsyncMPClient"
METHOD = "get_core_engine_for_request"
# the original method, on the patched class
ORIGINAL_ATTR = "_asyncbatch_original_get_core_engine_for_request"
# the per-client decision, on the client instance
ROUTER_ATTR = "_asyncbatch_dp_router"
# the per-client KeyLedger, on the client instance
LEDGER_ATTR = "_asyncbatch_dp_ledger"

# Under vLLM's logger, so that its handler and VLLM_LOGGING_LEVEL apply.
logger = logging.getLogger(f"vllm.{__name__}")
_lock = threading.Lock()


@dataclass(frozen=True)
class Router:
    """Routing settings of one client; None in its place means vLLM's balancing."""

    block_size: int
    prefix_tokens: int
    load_bound: float
    # requests an engine runs at once (max_num_seqs); None: no seat limit
    seats: int | None = None
    # requests an engine may hold above the mean (dp_load_slack)
    slack: float = 0.0
    # most of an engine's cap one key may hold (dp_key_share); applies when
    # `choose` is given a ledger
    key_share: float = DEFAULT_KEY_SHARE
    # a new key's slack above the mean (dp_new_key_slack); None: the bound's;
    # applies when `choose` is given a ledger
    new_key_slack: float | None = DEFAULT_NEW_KEY_SLACK

    def key(self, request: Any) -> bytes | None:
        tokens = getattr(request, "prompt_token_ids", None)
        if not tokens:
            return None
        lora = getattr(request, "lora_request", None)
        covered = key_length(len(tokens), self.block_size, self.prefix_tokens)
        return prefix_key(tokens, block_size=self.block_size, prefix_tokens=self.prefix_tokens,
                          cache_salt=getattr(request, "cache_salt", None),
                          lora_name=getattr(lora, "lora_name", None) if lora else None,
                          extra=_mm_identifiers(request, covered))

    def choose(self, request: Any, loads: Sequence[float], client_count: int = 1,
               ledger: KeyLedger | None = None, in_flight: Container[str] = ()
               ) -> int | None:
        """The rank for ``request``, or None to leave it to vLLM.  ``loads`` are in
        units of one request routed by this client, one of ``client_count`` API
        servers (`asyncbatch._compat.dp_engine_loads`), so an engine's seats
        count ``seats / client_count`` of those units.  With a ``ledger`` (this
        client's requests by key; ``in_flight``: the ids of this client's
        requests that have not finished) the key share applies and the choice
        is recorded there."""
        key = self.key(request)
        if key is None or not loads:
            return None
        clients = max(1, client_count)
        capacity = max(1.0, self.seats / clients) if self.seats else None
        key_load = ledger.loads(key, in_flight) if ledger is not None else None
        rank = rank_for(key, loads, self.load_bound, capacity=capacity,
                        slack=self.slack / clients, key_load=key_load,
                        key_share=self.key_share,
                        new_key_slack=None if self.new_key_slack is None
                        else self.new_key_slack / clients)
        if ledger is not None:
            ledger.record(key, request.request_id, rank, in_flight)
        return rank


class KeyLedger:
    """The requests one front end routed by key, for the key share: each key's
    requests per rank that are still in flight.

    Whether a request is still in flight is asked of the caller's ``in_flight``
    (vLLM's client keeps ``reqs_in_flight`` for abort routing and drops a
    request when its engine reports it finished), so the ledger needs no hook
    on completion: a key's entries are checked when that key is routed again,
    and all entries once the ledger holds more than twice the requests in
    flight (plus 1,024), so keys that never come back do not accumulate."""

    def __init__(self) -> None:
        self._by_key: dict[bytes, dict[str, int]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def loads(self, key: bytes, in_flight: Container[str]) -> dict[int, float]:
        """``key``'s requests in flight per rank."""
        entries = self._by_key.get(key)
        if not entries:
            return {}
        gone = [rid for rid in entries if rid not in in_flight]
        for rid in gone:
            del entries[rid]
        self._size -= len(gone)
        if not entries:
            del self._by_key[key]
            return {}
        counts: dict[int, float] = {}
        for rank in entries.values():
            counts[rank] = counts.get(rank, 0.0) + 1.0
        return counts

    def record(self, key: bytes, request_id: str, rank: int,
               in_flight: Container[str]) -> None:
        """``request_id`` (not in flight yet: it is being routed) went to ``rank``."""
        if self._size > 2 * _size_of(in_flight) + 1024:
            self.prune(in_flight)
        entries = self._by_key.setdefault(key, {})
        if request_id not in entries:
            self._size += 1
        entries[request_id] = rank

    def prune(self, in_flight: Container[str]) -> None:
        """Forget every request not in ``in_flight``."""
        for key in list(self._by_key):
            entries = self._by_key[key]
            for rid in [r for r in entries if r not in in_flight]:
                del entries[rid]
            if not entries:
                del self._by_key[key]
        self._size = sum(len(e) for e in self._by_key.values())


def _size_of(container: Container[str]) -> int:
    try:
        return len(container)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _mm_identifiers(request: Any, covered: int) -> list[str]:
    out = []
    for feature in getattr(request, "mm_features", None) or ():
        position = getattr(feature, "mm_position", None)
        offset = getattr(position, "offset", None)
        identifier = getattr(feature, "identifier", None)
        if identifier is not None and offset is not None and offset < covered:
            out.append(str(identifier))
    return out


def decide(vllm_config: Any, num_engines: int) -> tuple[Router | None, str]:
    """Whether a client with ``num_engines`` engines routes by prefix, and why."""
    from asyncbatch import _compat
    from asyncbatch.config import InvalidSettings, settings_of

    try:
        settings = settings_of(
            getattr(vllm_config, "additional_config", None))
    except InvalidSettings as e:
        return None, f"invalid settings ({e})"
    if settings.dp_routing == "off":
        return None, 'dp_routing is "off"'
    if num_engines < 2:
        return None, f"{num_engines} engine"
    if settings.dp_routing == "auto" and not _compat.scheduler_is_asyncbatch(vllm_config):
        return None, 'dp_routing is "auto" and the engines do not run asyncbatch.Scheduler'
    block_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None) or 16
    seats = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", None)
    router = Router(block_size=int(block_size), prefix_tokens=settings.dp_prefix_tokens,
                    load_bound=settings.dp_load_bound,
                    seats=int(seats) if isinstance(seats, int) and seats > 0 else None,
                    slack=settings.dp_load_slack, key_share=settings.dp_key_share,
                    new_key_slack=settings.dp_new_key_slack)
    covered = key_length(settings.dp_prefix_tokens, router.block_size,
                         settings.dp_prefix_tokens)
    new_key = ("off" if settings.dp_new_key_slack is None
               else f"{settings.dp_new_key_slack:g} requests")
    return router, (f"dp_routing {settings.dp_routing!r}: key = first {covered} tokens "
                    f"(blocks of {router.block_size}), load bound 1 + {settings.dp_load_bound:g}"
                    f" with a slack of {settings.dp_load_slack:g} requests, "
                    f"{router.seats or 'unlimited'} seats per engine, key share "
                    f"{settings.dp_key_share:g}, new-key slack {new_key}")


def router_of(client: Any) -> Router | None:
    """The client's `Router` (decided on its first request, then kept)."""
    try:
        return client.__dict__[ROUTER_ATTR]
    except KeyError:
        pass
    num_engines = len(getattr(client, "core_engines", ()) or ())
    try:
        router, why = decide(getattr(client, "vllm_config", None), num_engines)
    except Exception as e:  # never let routing break serving
        router, why = None, f"{type(e).__name__}: {e}"
    if router is not None:
        logger.info("asyncbatch: data-parallel prefix routing on over %d engines (%s)",
                    num_engines, why)
    else:
        logger.info("asyncbatch: data-parallel prefix routing off (%s); vLLM balances by "
                    "load", why)
    client.__dict__[ROUTER_ATTR] = router
    return router


def route(client: Any, request: Any, original: Callable[[Any, Any], Any]) -> Any:
    """``get_core_engine_for_request`` with prefix routing."""
    router = router_of(client)
    in_flight = getattr(client, "reqs_in_flight", None) or {}
    if (router is None or getattr(request, "data_parallel_rank", None) is not None
            or getattr(request, "pooling_params", None) is not None
            or request.request_id in in_flight):
        return original(client, request)
    from asyncbatch import _compat

    try:
        loads = _compat.dp_engine_loads(client)
        loads = loads[:len(client.core_engines)]
        ledger = client.__dict__.get(LEDGER_ATTR)
        if ledger is None:
            ledger = client.__dict__[LEDGER_ATTR] = KeyLedger()
        rank = router.choose(request, loads, _compat.dp_client_count(client), ledger,
                             in_flight)
    except Exception:  # never let routing fail a request: vLLM balances it
        logger.exception("asyncbatch: data-parallel prefix routing failed for request %s; "
                         "vLLM's balancing takes it", getattr(request, "request_id", "?"))
        rank = None
    if rank is None:
        return original(client, request)
    request.data_parallel_rank = rank
    try:
        engine = original(client, request)
    finally:
        request.data_parallel_rank = None
    _compat.dp_count_routed(client, rank)
    return engine


def patch_module(module: ModuleType) -> bool:
    """Wrap ``DPLBAsyncMPClient.get_core_engine_for_request`` in ``module``;
    True if it is wrapped (now or before)."""
    cls = getattr(module, TARGET_CLASS, None)
    if cls is None or not callable(getattr(cls, METHOD, None)):
        logger.warning("asyncbatch: %s.%s.%s not found; data-parallel prefix routing is "
                       "not installed", module.__name__, TARGET_CLASS, METHOD)
        return False
    with _lock:
        if ORIGINAL_ATTR in cls.__dict__:
            return True
        original = cls.__dict__.get(METHOD)
        if original is None:  # inherited, not defined here: not the client this was written for
            logger.warning("asyncbatch: %s.%s does not define %s; data-parallel prefix routing "
                           "is not installed", module.__name__, TARGET_CLASS, METHOD)
            return False

        @functools.wraps(original)
        def get_core_engine_for_request(self: Any, request: Any) -> Any:
            return route(self, request, original)

        setattr(cls, ORIGINAL_ATTR, original)
        setattr(cls, METHOD, get_core_engine_for_request)
    logger.debug("asyncbatch: data-parallel prefix routing installed in %s.%s",
                 module.__name__, TARGET_CLASS)
    return True


def unpatch_module(module: ModuleType) -> None:
    """Undo `patch_module` (tests)."""
    cls = getattr(module, TARGET_CLASS, None)
    with _lock:
        if cls is not None and ORIGINAL_ATTR in cls.__dict__:
            setattr(cls, METHOD, cls.__dict__[ORIGINAL_ATTR])
            delattr(cls, ORIGINAL_ATTR)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the module."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            patch_module(module)
        except Exception:  # never break vLLM's import
            logger.exception("asyncbatch: could not install data-parallel prefix routing")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands vLLM's ``core_client`` module, as the other
    finders find it, to `_PatchingLoader`."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET_MODULE:
            return None
        _remove_finder()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_finder: _Finder | None = None


def _remove_finder() -> None:
    global _finder
    with _lock:
        if _finder is not None and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _finder = None


def install() -> None:
    """Install the hook: patch vLLM's client now if its module is loaded, else
    when it is.  Imports nothing from vLLM."""
    global _finder
    module = sys.modules.get(TARGET_MODULE)
    if module is not None:
        patch_module(module)
        return
    with _lock:
        if _finder is None:
            _finder = _Finder()
            sys.meta_path.insert(0, _finder)
