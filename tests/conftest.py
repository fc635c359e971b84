"""Fixtures for real peers live in tests/fixtures/, one module per peer."""

pytest_plugins = [
    "tests.fixtures.pebble",
    "tests.fixtures.bind",
    "tests.fixtures.mailservices",
]
