"""Fixtures shared by several test modules (helpers that are not fixtures: petr_testing.py)."""

import pytest
from petr_testing import captured_log, demo_cfg


@pytest.fixture
def petr_log():
    """The messages the `petr` loggers emit at INFO or above during the test."""
    with captured_log("petr") as messages:
        yield messages


@pytest.fixture
def demo_config_file(tmp_path):
    """A yaml of `demo_cfg()`, for the command-line tools."""
    path = tmp_path / "tiny.yaml"
    path.write_text(demo_cfg().dump())
    return str(path)
