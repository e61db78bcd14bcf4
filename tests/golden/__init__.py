"""Golden outputs of the fp32 engine and their generator (make_golden.py)."""
