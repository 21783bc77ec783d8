"""The host -> device feed: batches are put on the device a few steps ahead of the step that
uses them, so the copy of batch s + 1 runs while step s computes (asynchronous dispatch)."""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

import jax
import numpy as np


def device_batches(
  host_batches: Iterable[np.ndarray], sharding, depth: int = 2
) -> Iterator[tuple[np.ndarray, jax.Array]]:
  """Yields (host batch, device batch) in order. `depth` batches are on their way to the devices
  when one is handed out (depth 2: the current one and the next; 1: copied when asked for).

  host batch: this process's rows, uint8 [B / processes, H, W, 3]; the device batch is the
  global array over `sharding` (jax.make_array_from_process_local_data), its copy issued at
  once and completed in the background (jax's transfers are asynchronous).
  """
  it = iter(host_batches)
  queue: collections.deque = collections.deque()
  depth = max(1, int(depth))
  done = False
  while True:
    while not done and len(queue) < depth:
      try:
        host = next(it)
      except StopIteration:
        done = True
        break
      queue.append((host, jax.make_array_from_process_local_data(sharding, host)))
    if not queue:
      return
    yield queue.popleft()
