"""distill: make neural networks small without losing accuracy.

Teacher-student distillation, soft weight-sharing (a learned Gaussian-mixture prior) and Deep Compression
(pruning, weight sharing, Huffman coding) as PyTorch Lightning modules and callbacks.
"""

__version__ = "0.1.0"
