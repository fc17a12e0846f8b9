"""Engines carry an algorithm's rounds to clients: in-process (simulator), later Flower and torchrun."""
