"""The test suite, grouped by what it tests: engine/, example/, docs/, gpu/; shared helpers in helpers.py, the float64
oracle in reference.py, the engine's worker process in engine_worker.py (python -m tests.engine_worker)."""
