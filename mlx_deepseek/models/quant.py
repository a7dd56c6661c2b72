"""Quantization plumbing shared by the stacked-matrix layers (attention heads, routed experts)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class QuantizedWeights(nn.Module):
    """Holds `weight`, `scales` (and `biases` in affine mode) of a quantized (N, out, in) stack."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    def matmul(self, x: mx.array, transpose: bool = True) -> mx.array:
        return mx.quantized_matmul(
            x, self["weight"], self["scales"], self.get("biases"), transpose=transpose,
            group_size=self.group_size, bits=self.bits, mode=self.mode,
        )

    def dequantized(self) -> mx.array:
        """The float (N, out, in) stack these weights hold."""
        return mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def gather_matmul(self, x: mx.array, indices: mx.array, sorted_indices: bool, lhs=None) -> mx.array:
        return mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), lhs_indices=lhs, rhs_indices=indices,
            transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
            sorted_indices=sorted_indices,
        )
