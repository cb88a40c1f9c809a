"""The dense store: each rank's shard of every sparsified layer's fp32 weights, in host memory (cpu.py) or on NVMe (nvme.py), with the shard arithmetic and checksums they share (shards.py)."""
