"""pytest-benchmark suites comparing stemgpu backends with the peers users would run."""
