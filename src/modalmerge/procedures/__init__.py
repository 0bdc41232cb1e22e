"""Procedures around the streaming engine: the one function that runs a merge (run.py), the
composed (mmer.py), sequential (continual.py) and whole-model (moe.py) procedures, calibration
forward passes (calibration.py, adamerging_fit.py) and weight matching (align.py)."""
