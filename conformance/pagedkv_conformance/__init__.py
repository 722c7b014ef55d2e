"""The pagedkv conformance suite."""
