"""Models that transformers does not ship, written for ds_topkast (their Linear layers are sparsifiable)."""
from ds_topkast.models.transformer_xl import PRESETS, TransformerXL, TransformerXLConfig, TransformerXLOutput

__all__ = ["PRESETS", "TransformerXL", "TransformerXLConfig", "TransformerXLOutput"]
