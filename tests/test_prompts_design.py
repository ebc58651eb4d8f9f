"""The all-pairs design: PAPER.md's sizes, coverage, and determinism (allpairspy under other hash seeds)."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys

import pytest

from synthdistill.prompts.design import allpairs_rows, choose_combinations, design_size


def uncovered(rows, sizes) -> int:
    """Pairs of (dimension, option) of two different dimensions that no row holds."""
    seen = {(a, row[a], b, row[b]) for row in rows for a, b in itertools.combinations(range(len(sizes)), 2)}
    pairs = [
        (a, x, b, y)
        for a, b in itertools.combinations(range(len(sizes)), 2)
        for x in range(sizes[a])
        for y in range(sizes[b])
    ]
    return sum(pair not in seen for pair in pairs)


@pytest.mark.parametrize("options, size", [(5, 30), (10, 111), (15, 265), (30, 1011)])
def test_papers_design_sizes_and_every_pair_covered(options, size):
    sizes = (options,) * 4
    assert design_size(sizes) == size
    assert uncovered(allpairs_rows(sizes), sizes) == 0


def test_design_is_the_same_under_other_hash_seeds():
    code = (
        "import json; from allpairspy import AllPairs; "
        "options = [[f'option {i} of {d}' for i in range(6)] for d in range(4)]; "
        "print(json.dumps([list(r) for r in AllPairs(options)]))"
    )
    designs = []
    for hash_seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        designs.append(json.loads(result.stdout))
    assert designs[0] == designs[1] == designs[2]
    indices = [[int(option.split()[1]) for option in row] for row in designs[0]]
    assert indices == [list(row) for row in allpairs_rows((6,) * 4)]  # the option text does not matter


def test_each_class_orders_the_options_by_its_seed():
    sizes = [4, 3, 5]
    first = choose_combinations("allpairs", sizes, 0, random.Random(1))
    again = choose_combinations("allpairs", sizes, 0, random.Random(1))
    other = choose_combinations("allpairs", sizes, 0, random.Random(2))
    assert first == again and first != other
    assert len(first) == len(other) == design_size(tuple(sizes)) and uncovered(other, sizes) == 0
    assert len(choose_combinations("random", sizes, 17, random.Random(1))) == 17


def test_fewer_than_two_dimensions_list_every_option():
    assert allpairs_rows((3,)) == ((0,), (1,), (2,))
