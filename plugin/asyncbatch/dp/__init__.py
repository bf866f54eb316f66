# SPDX-License-Identifier: Apache-2.0
"""Scale-out over data-parallel engines, keeping prefix groups together.

- `routing`: the pure routing function (a request's prefix key, rendezvous order
  of the ranks, bounded loads);
- `partition`: `partition_by_prefix`, for offline runs with one engine per GPU;
- `frontend`: the hook in vLLM's data-parallel front-end client
  (``DPLBAsyncMPClient``) that routes by key, installed by ``asyncbatch.register``.

Importing this package imports neither vLLM nor torch.
"""

from asyncbatch.dp.partition import partition_by_prefix
from asyncbatch.dp.routing import hrw_order, prefix_key, rank_for

__all__ = ["hrw_order", "partition_by_prefix", "prefix_key", "rank_for"]
