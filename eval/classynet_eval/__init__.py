"""Reproduction of the ClassyNet paper's evaluation (section VI) through this project's binaries.

`scripts/reproduce-paper` is the entry point; see `reproduce.py` for what each part measures.
"""
