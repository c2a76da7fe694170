"""scene3d.utils.text: the one ``plural`` (tiny LLM vocabulary, training rows, synthetic expressions)."""

from __future__ import annotations

import pytest

from data_prep.synth import NYU40
from scene3d.utils.text import plural


def _former_generator_plural(label: str) -> str:
    """data_prep.synth_refer's own rule before it used scene3d.utils.text (kept here as the reference)."""
    if label.endswith("shelf"):
        return label[:-1] + "ves"
    if label.endswith(("s", "x", "ch", "sh")):
        return label + "es"
    return label + "s"


@pytest.mark.parametrize("word, want", [
    ("chair", "chairs"), ("box", "boxes"), ("bench", "benches"), ("dish", "dishes"), ("glass", "glasses"),
    ("bookshelf", "bookshelves"), ("shelf", "shelves"), ("trash can", "trash cans"),
    ("kitchen cabinet", "kitchen cabinets"), ("shower curtain", "shower curtains"),
])
def test_plural(word, want):
    assert plural(word) == want


def test_the_generator_labels_read_as_before():
    """Every label the synthetic generator can place (its label table) gets the plural it had before the
    generator switched to the shared function, so the generated expressions keep their bytes."""
    assert len(NYU40) >= 10
    differ = {lab: (plural(lab), _former_generator_plural(lab)) for lab in NYU40
              if plural(lab) != _former_generator_plural(lab)}
    assert not differ, differ
    assert _former_generator_plural("leaf") != plural("leaf")   # the reference could tell them apart
