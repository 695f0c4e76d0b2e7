"""The math of IMM, pure functions of arrays: interpolants, parameterization, MMD, losses, samplers.

Imports only jax, numpy and itself (tests/test_imports.py checks it).
"""
