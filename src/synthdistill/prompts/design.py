"""Which option combinations become prompts: PAPER.md's all-pairs covering design, or a random sample.

``allpairs``: every pair of options of two different dimensions occurs in at least one prompt
(``allpairspy``, the library the authors use; 15 options per dimension -> 265 prompts, 30 -> 1011).
The design is built over option *indices*, so it is the same whatever the options' text, and each
class gets its own seeded order of each dimension's options, so classes that share options (the
``template`` generator) still pair them differently. ``random``: ``count`` combinations drawn without
replacement while unused ones remain.
"""

from __future__ import annotations

import itertools
import math
import random
from functools import lru_cache

DESIGNS = ("allpairs", "random")


@lru_cache(maxsize=8)
def allpairs_rows(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The all-pairs design over dimensions of ``sizes`` options, as option-index tuples.

    allpairspy is deterministic for a fixed input order (no hashing of the values is involved for
    int indices); with fewer than two dimensions every combination is a pair, so all are listed.
    """
    if len(sizes) < 2:
        return tuple(itertools.product(*(range(n) for n in sizes)))
    from allpairspy import AllPairs

    return tuple(tuple(row) for row in AllPairs([list(range(n)) for n in sizes]))


def design_size(sizes: tuple[int, ...]) -> int:
    """Prompts per class of the all-pairs design over ``sizes``."""
    return len(allpairs_rows(tuple(sizes)))


def sample_combinations(sizes: list[int], count: int, rng: random.Random) -> list[tuple[int, ...]]:
    """``count`` option-index tuples over dimensions of ``sizes`` options each.

    The first prod(sizes) are all distinct while ``count`` <= prod(sizes); beyond that, every
    further round of prod(sizes) draws starts the combinations afresh.
    """
    total = math.prod(sizes)
    flat: list[int] = []
    while len(flat) < count:
        flat += rng.sample(range(total), min(total, count - len(flat)))
    combinations = []
    for index in flat:
        digits = []
        for size in reversed(sizes):
            index, digit = divmod(index, size)
            digits.append(digit)
        combinations.append(tuple(reversed(digits)))
    return combinations


def choose_combinations(
    design: str, sizes: list[int], count: int, rng: random.Random
) -> list[tuple[int, ...]]:
    """Option-index tuples for one class: the all-pairs design with each dimension's options in an
    order drawn from ``rng`` (``count`` is ignored), or ``count`` random combinations."""
    if design == "random":
        return sample_combinations(sizes, count, rng)
    orders = [rng.sample(range(n), n) for n in sizes]
    return [
        tuple(order[i] for order, i in zip(orders, row, strict=True)) for row in allpairs_rows(tuple(sizes))
    ]
