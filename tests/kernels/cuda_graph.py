"""CUDA-graph capture for the kernel tests: benchmarks/kernel_bench.py's capture (warm a step up on a
side stream, then capture it). capture(step) returns (graph, the captured step's outputs)."""
from aot import load_benchmark

capture = load_benchmark("kernel_bench").capture
