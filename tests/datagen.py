"""Kept while tests/test_aot_global.py imports it (that file is being removed); use training.testdata."""

from training.testdata import make_dataset # noqa: F401
