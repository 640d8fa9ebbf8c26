"""CUDA-graph capture for the kernel tests: warm a step up on a side stream (Triton compiles, the
allocator makes its pools), then capture it. Returns (graph, the captured step's outputs)."""
import torch


def capture(step):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
