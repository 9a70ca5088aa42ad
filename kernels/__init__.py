"""zephyr_kernels: fused LM-head log-prob / cross-entropy / DPO kernels (placeholder until issue 2 lands)."""
