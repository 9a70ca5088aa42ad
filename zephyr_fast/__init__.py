"""zephyr_fast: a performance-first trainer for the Zephyr recipe (dSFT -> AIF -> dDPO)."""

__version__ = "0.1.0"
