"""Weight sharing (Deep Compression): k-means clustering and the Huffman-coded compact file."""

from edgeslim.cluster.format import (decode_state, encode_state, load_compressed, load_module, load_onnx, read_header,
                                     save_compressed)
from edgeslim.cluster.huffman import canonical_codes, code_lengths
from edgeslim.cluster.huffman import decode as huffman_decode
from edgeslim.cluster.huffman import encode as huffman_encode
from edgeslim.cluster.kmeans import Clustered, cluster_tensor, finalize, kmeans_1d, share_weights
from edgeslim.cluster.technique import ClusterConfig, cluster_step

__all__ = [
    "ClusterConfig", "Clustered", "canonical_codes", "cluster_step", "cluster_tensor", "code_lengths",
    "decode_state", "encode_state", "finalize", "huffman_decode", "huffman_encode", "kmeans_1d",
    "load_compressed", "load_module", "load_onnx", "read_header", "save_compressed", "share_weights",
]
