"""Weight sharing (Deep Compression): k-means clustering and the Huffman-coded compact file."""
