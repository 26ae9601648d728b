"""The kernels wing: which matmul each linear layer runs (PyTorch, oneDNN, our
C kernels in kernels.c), the native bindings, huge pages, compiled and fused
decoding.

Kernels change a built model from outside: they swap leaf layers and install
fused decoding as a hook; the model imports nothing from here."""
