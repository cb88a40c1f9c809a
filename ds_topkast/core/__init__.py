"""The sparse layer and what it is built from, in torch alone: bitmaps, the fused ops, exact top-K selection, per-layer densities."""
