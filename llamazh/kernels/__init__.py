"""Triton kernels and their launchers: plain tensors in and out.

Modules here import only torch and triton (never ``torch.nn`` or transformers). Every kernel
has a pure-PyTorch reference in the matching top-level module (``llamazh.rope``,
``llamazh.attention``), which is what runs where Triton is not available.
"""
