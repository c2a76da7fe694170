"""English word forms shared by the tiny LLM's vocabulary, the training rows and the synthetic expressions."""

from __future__ import annotations


def plural(word: str) -> str:
    """English plural of a class name's last word (``trash can`` -> ``trash cans``, ``bookshelf`` ->
    ``bookshelves``, ``box`` -> ``boxes``).

    Hand-written rather than a library (inflect, ...): the three suffix rules cover every class name the
    project uses, and the tiny LLM's vocabulary is built from this output, so it must never change silently.
    """
    head, _, last = word.rpartition(" ")
    if last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("f"):
        last = last[:-1] + "ves"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def indefinite(words: str) -> str:
    """``words`` behind its indefinite article by the first letter (``a chair``, ``an orange chair``): enough
    for the class and colour names the project writes."""
    return ("an " if words[:1] in "aeiou" else "a ") + words
