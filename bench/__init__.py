"""Benchmarks of spiffe-delegate, each measured against a floor or a peer in the same run.

Run all of them: ``python -m bench``; see ``python -m bench --help``.
"""
