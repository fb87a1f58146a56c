"""The hyper-parameter grid, the choice of the best configuration, and the weight-decay search.

A grid is the product learning rates x weight decays x seeds; every probe of it is a
:class:`ProbeConfig` with a stable ``index`` (its row in the results). The configuration
(lr, wd) is scored by its mean best validation accuracy over seeds.

The paper's weight-decay search: train a log grid of weight decays, then train the geometric
midpoints between the best value and its neighbours among those tried, and repeat around the new
best until the step (in decades) falls below ``min_step``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    index: int
    lr: float
    wd: float
    seed: int
    round: int = 0


def _values(values, name: str, convert, scalars, example: str, kind: str) -> tuple:
    """A comma-separated string, one scalar or a sequence -> a non-empty tuple."""
    if isinstance(values, str):
        values = [part for part in values.split(",") if part.strip()]
    elif isinstance(values, scalars):
        values = [values]
    try:
        result = tuple(convert(value) for value in values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be {kind} (e.g. '{example}'), got {values!r}") from error
    if not result:
        raise ValueError(f"{name} is empty")
    return result


def _no_repeats(result: tuple, name: str) -> tuple:
    if len(set(result)) != len(result):
        raise ValueError(f"{name} repeats a value: {list(result)}")
    return result


def _floats(values, name: str, *, positive: bool) -> tuple[float, ...]:
    result = _values(values, name, float, (int, float), "1e-4,1e-3", "numbers")
    for value in result:
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(f"{name} values must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return _no_repeats(result, name)


SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)  # torch.manual_seed and the checkpoints keep seeds as int64


def _ints(values, name: str) -> tuple[int, ...]:
    result = _values(values, name, int, int, "0,1", "integers")
    for value in result:
        if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise ValueError(f"{name} values must be 64-bit integers (in [-2**63, 2**63 - 1]), got {value}")
    return _no_repeats(result, name)


@dataclasses.dataclass(frozen=True)
class SweepGrid:
    """Learning rates x weight decays x seeds. Fields accept sequences or '1e-4,1e-3' strings."""

    lr: tuple[float, ...]
    wd: tuple[float, ...]
    seed: tuple[int, ...] = (0,)

    def __post_init__(self):
        object.__setattr__(self, "lr", _floats(self.lr, "lr", positive=True))
        object.__setattr__(self, "wd", _floats(self.wd, "wd", positive=False))
        object.__setattr__(self, "seed", _ints(self.seed, "seed"))

    @classmethod
    def coerce(cls, grid: Union["SweepGrid", Mapping]) -> "SweepGrid":
        if isinstance(grid, SweepGrid):
            return grid
        if isinstance(grid, Mapping):
            unknown = set(grid) - {"lr", "wd", "seed", "seeds"}
            if unknown or "lr" not in grid or "wd" not in grid:
                raise ValueError(f"grid needs keys 'lr' and 'wd' (and optionally 'seed'), got {sorted(grid)}")
            return cls(grid["lr"], grid["wd"], grid.get("seed", grid.get("seeds", (0,))))
        raise TypeError(f"grid must be a SweepGrid or a mapping with 'lr', 'wd', 'seed'; got {type(grid).__name__}")

    def configs(self, start_index: int = 0, round: int = 0) -> list[ProbeConfig]:
        """All probes, ordered lr, then wd, then seed."""
        return configs_for(self.lr, self.wd, self.seed, start_index, round)

    def __len__(self) -> int:
        return len(self.lr) * len(self.wd) * len(self.seed)


def configs_for(lrs: Iterable[float], wds: Iterable[float], seeds: Iterable[int], start_index: int = 0,
                round: int = 0) -> list[ProbeConfig]:
    configs = []
    for lr in lrs:
        for wd in wds:
            for seed in seeds:
                configs.append(ProbeConfig(start_index + len(configs), float(lr), float(wd), int(seed), round))
    return configs


def config_scores(rows: Sequence[Mapping], key: str = "best_val_acc") -> dict[tuple[float, float], float]:
    """Mean ``key`` over seeds for every (lr, wd), in the order configurations first appear."""
    sums: dict[tuple[float, float], list[float]] = {}
    for row in sorted(rows, key=lambda row: row["index"]):
        sums.setdefault((row["lr"], row["wd"]), []).append(float(row[key]))
    return {config: sum(values) / len(values) for config, values in sums.items()}


def eligible(rows: Sequence[Mapping]) -> list:
    """The rows of the configurations (lr, wd) where no seed diverged: only those can be best."""
    diverged = {(row["lr"], row["wd"]) for row in rows if row.get("diverged")}
    return [row for row in rows if (row["lr"], row["wd"]) not in diverged]


def best_config(rows: Sequence[Mapping]) -> tuple[float, float]:
    """(lr, wd) with the highest mean best validation accuracy among those that did not diverge;
    ties go to the earlier one."""
    scores = config_scores(eligible(rows))
    if not scores:
        raise ValueError("no results to choose from (every configuration diverged)")
    return max(scores, key=lambda config: scores[config])  # max keeps the first of equal scores


def refine_weight_decays(tried: Iterable[float], best: float, min_step: float = 0.1) -> list[float]:
    """Geometric midpoints between ``best`` and its neighbours among ``tried`` weight decays.

    A midpoint is proposed only while it lies at least ``min_step`` decades from ``best`` (the
    step "vanishes" below that) and is not already tried. Weight decays must be > 0 (log grid).
    """
    ordered = sorted(set(float(value) for value in tried))
    if best not in ordered:
        raise ValueError(f"best={best} is not among the tried weight decays {ordered}")
    if any(value <= 0 for value in ordered):
        raise ValueError(f"the weight-decay search works on a log grid: all values must be > 0, got {ordered}")
    position = ordered.index(best)
    neighbours = ordered[max(0, position - 1):position] + ordered[position + 1:position + 2]
    proposals = []
    for neighbour in neighbours:
        middle = 0.5 * (math.log10(best) + math.log10(neighbour))
        if abs(middle - math.log10(best)) < min_step:
            continue
        value = float(f"{10 ** middle:.6g}")  # readable values; 6 digits keep steps >= 1e-5 decades apart
        if value not in ordered and value not in proposals:
            proposals.append(value)
    return sorted(proposals)


def next_search_round(rows: Sequence[Mapping], seeds: Sequence[int], round: int, min_step: float = 0.1,
                      ) -> Optional[list[ProbeConfig]]:
    """The configurations of the next weight-decay search round, or None when the search is over.

    The search refines around the best (lr, wd) so far, at that learning rate, with every seed;
    it ends when every configuration diverged.
    """
    if not eligible(rows):
        return None
    lr, wd = best_config(rows)
    tried = [row["wd"] for row in rows if row["lr"] == lr]
    new = refine_weight_decays(tried, wd, min_step)
    if not new:
        return None
    start = max(row["index"] for row in rows) + 1
    return configs_for([lr], new, seeds, start, round)
