"""Helpers the tests and the benchmarks share (real data sets, tiny configs, crash and fuzz harnesses).

Not used by the plugin itself: ``tests/`` and ``benchmarks/`` import them from here, so neither needs the
other's folder on ``sys.path``. :mod:`.training` holds tiny model configs and small real data sets,
:mod:`.crash` the kill -9 / start-stop harness, :mod:`.fuzz` the reader fuzzer's mutators and worker.
"""
