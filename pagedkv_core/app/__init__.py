"""What runs on top of the library: the ``pagedkv`` command line, the demo and the benchmark runner."""
