"""Speed and memory benchmarks (ratios measured in one run): training, decoding, kernels."""
