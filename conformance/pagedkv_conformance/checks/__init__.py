"""The conformance checks, one module per area.

They run against whatever targets the plugin selected. A third-party
backend can also pull them into its own test suite with one line per area,
e.g. ``from pagedkv_conformance.checks.test_attention import *``.
"""
