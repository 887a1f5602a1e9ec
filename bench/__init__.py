"""pyvmm benchmarks: `python -m bench` prints JSON results."""
