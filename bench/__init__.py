"""Benchmark of kaiju-tasks against pgqueuer and procrastinate (see bench/README.md)."""
