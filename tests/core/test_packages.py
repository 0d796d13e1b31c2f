"""Module packages: contiguous split (docs/METHOD.md §3)."""

import pytest

from obsdiff.packages import split_packages


def test_split_96_units_into_4_packages_of_24():
    packages = split_packages(list(range(96)), 4)
    assert [len(p) for p in packages] == [24] * 4
    assert sum(packages, []) == list(range(96))


def test_first_packages_get_the_remainder():
    assert [len(p) for p in split_packages(list(range(10)), 4)] == [3, 3, 2, 2]


def test_more_packages_than_units_gives_one_unit_each():
    assert split_packages([1, 2, 3], 10) == [[1], [2], [3]]


def test_one_package_holds_everything():
    assert split_packages(list(range(7)), 1) == [list(range(7))]


def test_zero_packages_rejected():
    with pytest.raises(ValueError, match="num_packages"):
        split_packages([1], 0)
