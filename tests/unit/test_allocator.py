"""Which malloc a model-loading command re-executes under (`posttrain.cli.allocator`), and that it really does."""

from __future__ import annotations

import pytest

from posttrain.cli import allocator
from posttrain.errors import UserError

BOTH = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}


def _finder(found):
    return lambda name: found.get(name)


@pytest.mark.parametrize(
    ("env", "found", "expected"),
    [
        ({}, BOTH, "libtcmalloc_minimal.so.4"),  # auto prefers tcmalloc
        ({"POSTTRAIN_MALLOC": "auto"}, {"jemalloc": "libjemalloc.so.2"}, "libjemalloc.so.2"),  # then jemalloc
        ({}, {}, None),  # neither installed: glibc's, no error
        ({"POSTTRAIN_MALLOC": " JEMALLOC "}, BOTH, "libjemalloc.so.2"),  # by name, case and spaces forgiven
        ({"POSTTRAIN_MALLOC": "system"}, BOTH, None),
        ({"POSTTRAIN_MALLOC_REEXEC": "libtcmalloc_minimal.so.4"}, BOTH, None),  # never twice
        ({"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}, BOTH, None),  # the user's own preload stays
        ({"POSTTRAIN_MALLOC": ""}, BOTH, "libtcmalloc_minimal.so.4"),  # empty means auto
    ],
)
def test_choose(env, found, expected):
    assert allocator.choose(env, _finder(found), platform="linux") == expected


def test_choose_elsewhere_than_linux_keeps_the_system_allocator():
    assert allocator.choose({"POSTTRAIN_MALLOC": "tcmalloc"}, _finder(BOTH), platform="darwin") is None


def test_unknown_value_is_a_user_error_naming_the_variable():
    with pytest.raises(UserError, match=r"POSTTRAIN_MALLOC='mimalloc' is not one of auto, tcmalloc, jemalloc, system"):
        allocator.choose({"POSTTRAIN_MALLOC": "mimalloc"}, _finder(BOTH), platform="linux")


def test_a_library_asked_by_name_but_missing_says_how_to_install_it():
    with pytest.raises(UserError, match=r"POSTTRAIN_MALLOC=jemalloc but no jemalloc .* apt-get install libjemalloc2"):
        allocator.choose({"POSTTRAIN_MALLOC": "jemalloc"}, _finder({"tcmalloc": "x"}), platform="linux")
