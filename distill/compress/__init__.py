"""Deep Compression (Han, Mao & Dally, ICLR 2016): pruning, weight sharing, Huffman coding, a real compressed file.

Pure maths lives in :mod:`~distill.compress.pruning`, :mod:`~distill.compress.kmeans`,
:mod:`~distill.compress.huffman` and :mod:`~distill.compress.sparse`; the file format in
:mod:`~distill.compress.fileformat` (documented in ``docs/FORMAT.md``); the size report in
:mod:`~distill.compress.report`; the exact clean-up of dead hidden units in :mod:`~distill.compress.structure`.
"""

from distill.compress.fileformat import (
    CompressedFileError,
    decode_into,
    load_compressed,
    load_compressed_state_dict,
    read_header,
    save_compressed,
)
from distill.compress.params import compressible_parameters, parameter_kinds
from distill.compress.quantize import (
    SharedWeights,
    apply_codebooks,
    finetune_centroids,
    finetune_weights,
    quantize_model,
)
from distill.compress.report import compression_report, report_markdown, write_report
from distill.compress.structure import remove_dead_units

__all__ = [
    "CompressedFileError",
    "SharedWeights",
    "apply_codebooks",
    "compressible_parameters",
    "compression_report",
    "decode_into",
    "finetune_centroids",
    "finetune_weights",
    "load_compressed",
    "load_compressed_state_dict",
    "parameter_kinds",
    "quantize_model",
    "read_header",
    "remove_dead_units",
    "report_markdown",
    "save_compressed",
    "write_report",
]
