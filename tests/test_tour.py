"""docs/tour.md runs as written: every line number it names and every shape it prints is today's."""

import doctest
from pathlib import Path

TOUR = Path(__file__).resolve().parent.parent / "docs" / "tour.md"


def test_the_tour_runs_as_written(default_weights):
    assert default_weights.resolve() == (TOUR.parent.parent / "weights" / "smollm2-135m-instruct").resolve()
    result = doctest.testfile(str(TOUR), module_relative=False, optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 60 and result.failed == 0, result
