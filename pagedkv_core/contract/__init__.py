"""What a backend author reads: the backend and storage protocols, the attention base that
validates once and calls the backend's ``plan_index``, the shared checks, decode tiling,
int8 quantization and the plugin hook specifications.
"""
