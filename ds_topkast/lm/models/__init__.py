"""The language models the training command trains: our Transformer-XL and how the command runs each model kind."""
