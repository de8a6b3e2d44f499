"""WriteSAE: sparse autoencoders on the matrix cache writes of recurrent language models."""
__version__ = "0.1.0"
