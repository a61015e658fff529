"""The tally of the untrusted-input corpus (tests/test_untrusted.py, test_attacks.py,
test_untrusted_state.py, test_byteflip.py): each case records how it ended, refused (a clear
error) or correct (the right data). conftest.py counts the corpus tests that failed in the same run and writes both
to test-artifacts/untrusted.json at the end of the session, for the README's table."""

from __future__ import annotations

from collections import Counter

OUTCOMES: Counter = Counter()  # (input class, outcome) -> cases
CORPUS_FILES = ("test_untrusted.py", "test_attacks.py", "test_untrusted_state.py", "test_byteflip.py")


def record(kind: str, outcome: str, n: int = 1) -> None:
    """Count ``n`` cases of input class ``kind`` that ended ``outcome`` ("refused" or "correct")."""
    assert outcome in ("refused", "correct"), outcome
    OUTCOMES[(kind, outcome)] += n


def report(failed: list[str]) -> dict:
    """The counts by class, and the corpus tests that failed (each an unsafe or wrong outcome)."""
    by_class: dict[str, dict[str, int]] = {}
    for (kind, result), n in sorted(OUTCOMES.items()):
        by_class.setdefault(kind, {})[result] = n
    return {
        "cases": sum(OUTCOMES.values()),
        "failed_tests": len(failed),
        "failed": failed,
        "by_class": by_class,
    }
