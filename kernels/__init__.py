"""GPU kernels, installed as ``swiftfusion_xdit.kernels`` (source in ``kernels/``).

``lse_merge``: the exact log-sum-exp merge of one attention block into
float32 accumulators, in one launch (Torus Attention on CUDA).

``peer_copy``: Triton kernels for the one-sided NVSHMEM transport -- stores
into NVLink-mapped peer buffers with the Ulysses packing fused in, and
per-source signal flags instead of send/recv. Each module imports
``triton`` itself (the package does not); the CPU tests run the kernels under
Triton's interpreter.
"""
