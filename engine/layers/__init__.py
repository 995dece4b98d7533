"""Building blocks shared by the model files: attention backends, rotary, merged linears, and
the quantized linears / embeddings the engine swaps in (quantized_linear.py, quant_blocks.py)."""
