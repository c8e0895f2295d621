"""Helpers of the PXE tests: test configurations and real firmware under QEMU."""
