"""pytest plugin entry of the pagedkv conformance suite."""
