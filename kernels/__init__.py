"""Raw CUDA C++ sources of stemgpu, shipped inside the wheel as ``stemgpu.kernels``."""
