"""dashkv: long-context decoding as nearest-neighbour search in a learned Hamming space (DASH-KV)."""

__version__ = "0.1.0"
