"""Glue to training frameworks that build the DeepSpeed engine themselves."""
