"""Activation sparsity for GeGLU/SwiGLU FFNs: calibration, neuron selectors, neuron cache."""
