"""The one timing loop the benchmark scripts share."""

from __future__ import annotations

import time

import torch


def call_seconds(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after one warm-up call (caches, allocator,
    lazy kernels), with the CUDA queue drained around each call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def print_table(header: list[str], align: list[str], rows: list[list[str]]) -> None:
    """A markdown table: `align` holds each column's separator ("---" or "---:")."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(align) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
