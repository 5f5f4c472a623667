"""The memory-budget profiler behind `run-model profile`: speed, memory and quality of each
setting at each budget, beside llama.cpp, every cell in a fresh child under a real limit."""
