"""ka-testbed: a real local cluster (nodes with sshd and disks, IPMI BMCs, PXE-driven boot)."""
