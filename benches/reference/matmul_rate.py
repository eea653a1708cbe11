"""PyTorch's matmul rate at the shapes of benches/examples/matmul_rate.rs (fp32, CPU).

target/reference-venv/bin/python benches/reference/matmul_rate.py
"""
import time

import torch

torch.set_num_threads(torch.get_num_threads())
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for m, k, n in [(1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384), (4096, 384, 1536)]:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    reps = 50
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    seconds = (time.perf_counter() - started) / reps
    print(f"torch matmul {m}x{k}x{n}: {seconds * 1e3:6.2f} ms, {2 * m * k * n / seconds / 1e9:4.0f} GFLOP/s")
