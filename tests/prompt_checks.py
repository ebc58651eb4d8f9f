"""Checks on prompts.jsonl shared by the prompt tests, written without allpairspy."""

from __future__ import annotations

import itertools
import json


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def uncovered_pairs(lines: list[dict], options: dict) -> list:
    """Pairs of options of two different dimensions that no line's ``options`` hold."""
    seen = {
        (a, line["options"][a], b, line["options"][b])
        for line in lines
        for a, b in itertools.combinations(options, 2)
    }
    return [
        (a, x, b, y)
        for a, b in itertools.combinations(options, 2)
        for x in options[a]
        for y in options[b]
        if (a, x, b, y) not in seen
    ]
