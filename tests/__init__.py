"""The incstore test suite."""
