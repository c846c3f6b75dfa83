"""The tests. Helpers that test modules share live in modules of their own; pytest rewrites the
asserts of those that took over test modules' helpers, as it rewrites the test modules', so a
failing helper assert still shows its values."""

import pytest

pytest.register_assert_rewrite("tests.cli_helpers", "tests.registry_helpers")
