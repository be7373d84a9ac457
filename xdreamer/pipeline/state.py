"""Where a run is and what it has seen, and the seeds of its parts.

Every part (geometry network, material network, CG-LoRA adapters, camera MLP, the run's own random
draws) gets its own seed derived from the run's seed, so switching one part off or changing its
size leaves every other part's initial weights and random stream as they were."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

STAGES = ("init", "geometry", "appearance", "export", "done")


def part_seed(seed: int, part: str) -> int:
    """A seed in [0, 2^63) for one named part of a run, a fixed function of (seed, part)."""
    digest = hashlib.sha256(f"xdreamer/{seed}/{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, part: str) -> Iterator[None]:
    """Run the block (typically building a module, whose initializers draw from torch's global
    generator) with the global CPU generator seeded for `part`; its state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(seed, part))
        yield


@dataclass
class RunState:
    """The loop's position and history; stored in every checkpoint as plain JSON values.

    restores: one record per return to the last good checkpoint ({stage, step, returned_to,
    redone, reason, lr}); losses: every 10th step's values per "stage/name"; alignment:
    "stage/side" -> [[step, IoU], ...], the attention-mask alignment diagnostic; mesh: what the
    geometry stage's clean-up found and removed; export: the exported mesh's simplification
    (`SimplifyReport.to_dict`)."""

    stage: str = "init"
    step: int = 0
    nan_skips: int = 0
    consecutive_skips: int = 0
    overflow_skips: int = 0
    restores: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    latest_losses: dict[str, float] = field(default_factory=dict)
    alignment: dict[str, list[list[float]]] = field(default_factory=dict)
    mesh: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(values: dict) -> RunState:
        known = {f.name for f in dataclasses.fields(RunState)}
        return RunState(**{k: v for k, v in values.items() if k in known})

    @property
    def position(self) -> tuple[int, int]:
        """(stage index, step): orders checkpoints in the run's time."""
        return STAGES.index(self.stage), self.step
