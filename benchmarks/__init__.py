"""Speed, memory and accuracy benchmarks. ``make bench`` (``python -m benchmarks``) prints JSON."""
