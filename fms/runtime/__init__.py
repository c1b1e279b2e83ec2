"""Below both generate() and the engine: the sampler, the decode-window runner with CUDA-graph capture."""
