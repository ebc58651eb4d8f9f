"""'a' or 'an' follows the sound of the next word, not its first letter."""

import pytest

from synthdistill.prompts.templates import article, subject_phrase


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("European robin", "a"), ("Eurasian jay", "a"), ("unicorn", "a"), ("uniform", "a"), ("user", "a"),
        ("one-eyed cat", "a"), ("UFO", "a"), ("U-boat", "a"), ("NASA rocket", "a"), ("horse", "a"),
        ("Boeing 707", "a"), ("hour", "an"), ("honest dog", "an"), ("heirloom", "an"), ("MRI scanner", "an"),
        ("SUV", "an"), ("X-ray", "an"), ("FBI agent", "an"), ("8-ball", "an"), ("Abyssinian", "an"),
        ("Egyptian Mau", "an"), ("owl", "an"), ("umbrella", "an"), ("idea", "an"),
    ],
)  # fmt: skip
def test_article_by_sound(phrase, expected):
    assert article(phrase) == expected


def test_the_llm_generators_subject_uses_it():
    assert subject_phrase(("a photo of a {c}, a type of bird.",), "European robin", "bird") == (
        "a photo of a European robin, a type of bird"
    )
