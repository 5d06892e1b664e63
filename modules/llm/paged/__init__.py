"""The paged KV engine (vLLM's design on Atelier's model): block pool, block tables, scheduler, loop.

Only :mod:`.paged_engine` knows about rows and sampling; the pool, the tables and the scheduler are plain
bookkeeping, testable without a model.
"""
