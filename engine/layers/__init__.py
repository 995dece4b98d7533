"""Building blocks shared by the model files: attention backends, rotary, merged linears."""
