"""Adapters of the peer task queues (same interface as bench/kaiju.py)."""
