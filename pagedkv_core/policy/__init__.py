"""Policy the manager applies and backends never see: eviction (which sequences or blocks
to give up) and memory pressure (levels, watermarks, callbacks).
"""
