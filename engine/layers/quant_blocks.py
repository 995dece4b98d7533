"""Block-quantized weights: GGUF's Q4_0 / Q4_1 / Q8_0, read from a file or made from floats.

A weight is quantized along its input dimension in blocks of 32 values, each block with an
fp16 scale d (and, for Q4_1, an fp16 min m):

    Q4_0  code u in 0..15      value = d * (u - 8)
    Q4_1  code u in 0..15      value = d * u + m
    Q8_0  code q in -127..127  value = d * q

`BlockRows` holds one code per value, row by row: what a GGUF tensor or `quantize()` gives,
what merged projections concatenate, and what `dequantize()` turns back into floats (the
reference the kernels are tested against). `pack()` rearranges it into `PackedBlocks`, the
layout engine/csrc/quant_blocks.h reads (16 output rows interleaved per 64-byte vector).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32                    # values per block along the input dimension
GROUP_ROWS = 16               # output rows packed together
FORMATS = ("Q4_0", "Q4_1", "Q8_0")       # index = the kernels' format code
# GGUF bytes per block: fp16 d, (fp16 m,) then the codes.
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True)
class BlockRows:
    """A (rows, cols) weight as one code per value plus per-block scales (and mins)."""

    format: str
    codes: torch.Tensor                 # (rows, cols): uint8 0..15 (4-bit) or int8 (Q8_0)
    scales: torch.Tensor                # (rows, cols // 32) float16
    mins: torch.Tensor | None = None    # (rows, cols // 32) float16, Q4_1 only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def bits(self) -> int:
        return 8 if self.format == "Q8_0" else 4

    @classmethod
    def from_gguf(cls, format: str, raw: np.ndarray | torch.Tensor) -> "BlockRows":
        """GGUF tensor data, uint8 (rows, cols // 32 * bytes per block), as llama.cpp writes it."""
        raw = torch.as_tensor(np.ascontiguousarray(raw))
        rows = raw.shape[0]
        blocks = raw.reshape(rows, -1, GGUF_BLOCK_BYTES[format])    # (rows, num_blocks, bytes)

        def half(offset: int) -> torch.Tensor:
            return blocks[..., offset: offset + 2].contiguous().view(torch.float16)[..., 0]

        if format == "Q8_0":
            codes = blocks[..., 2:].contiguous().view(torch.int8)    # (rows, num_blocks, 32)
            return cls(format, codes.reshape(rows, -1), half(0))
        packed = blocks[..., 4:] if format == "Q4_1" else blocks[..., 2:]   # (rows, blocks, 16)
        # Byte j of a block holds value j in its low nibble and value j + 16 in its high one.
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(rows, -1)
        return cls(format, codes, half(0), half(2) if format == "Q4_1" else None)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bits: int) -> "BlockRows":
        """Round a float weight to Q8_0 (bits=8: symmetric) or Q4_1 (bits=4: min and scale).

        Codes are rounded against the fp16 scale and min actually stored, not the exact ones."""
        rows, cols = weight.shape
        blocks = weight.detach().float().reshape(rows, cols // BLOCK, BLOCK)
        if bits == 8:
            scales = (blocks.abs().amax(-1) / 127).half()
            codes = (blocks / _nonzero(scales)[..., None]).round().clamp(-127, 127)
            return cls("Q8_0", codes.to(torch.int8).reshape(rows, cols), scales)
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        mins, scales = lo.half(), ((hi - lo) / 15).half()
        codes = ((blocks - mins.float()[..., None]) / _nonzero(scales)[..., None]).round().clamp(0, 15)
        return cls("Q4_1", codes.to(torch.uint8).reshape(rows, cols), scales, mins)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (rows, cols) these codes stand for."""
        rows, cols = self.shape
        codes = self.codes.float().reshape(rows, cols // BLOCK, BLOCK)
        scales = self.scales.float()[..., None]
        if self.format == "Q4_0":
            values = scales * (codes - 8)
        elif self.format == "Q4_1":
            values = scales * codes + self.mins.float()[..., None]
        else:
            values = scales * codes
        return values.reshape(rows, cols)

    def as_q4_1(self) -> "BlockRows":
        """Q4_0 written as Q4_1 (m = -8 d, exact in fp16), so the two can share a matrix."""
        if self.format != "Q4_0":
            return self
        return BlockRows("Q4_1", self.codes, self.scales, -8 * self.scales)

    @staticmethod
    def cat(parts: list["BlockRows"]) -> "BlockRows | None":
        """Rows of several weights stacked (a merged q/k/v); None if their formats cannot mix."""
        formats = {p.format for p in parts}
        if len(formats) > 1:
            if "Q8_0" in formats:
                return None
            parts = [p.as_q4_1() for p in parts]
        mins = torch.cat([p.mins for p in parts]) if parts[0].mins is not None else None
        return BlockRows(parts[0].format, torch.cat([p.codes for p in parts]),
                         torch.cat([p.scales for p in parts]), mins)

    def pack(self) -> "PackedBlocks":
        return PackedBlocks.pack(self)


@dataclass(frozen=True)
class PackedBlocks:
    """The kernels' layout (engine/csrc/quant_blocks.h) of a (out_features, in_features) weight."""

    format: str
    out_features: int
    in_features: int
    codes: torch.Tensor                 # uint8 (groups, blocks, 256 | 512)
    scales: torch.Tensor                # float16 (groups, blocks, 16)
    mins: torch.Tensor | None           # float16 (groups, blocks, 16), Q4_1 only

    @property
    def format_code(self) -> int:
        return FORMATS.index(self.format)

    @classmethod
    def pack(cls, rows: BlockRows) -> "PackedBlocks":
        out_features, in_features = rows.shape
        padded = -(-out_features // GROUP_ROWS) * GROUP_ROWS     # zero rows complete the last group
        groups, blocks = padded // GROUP_ROWS, in_features // BLOCK
        codes = _pad_rows(rows.codes.view(torch.uint8), padded)
        if rows.bits == 4:
            # (g, r, b, h, j, t): column 32b + 16h + 4j + t -> vector j, byte 4r + t, nibble h.
            c = codes.view(groups, GROUP_ROWS, blocks, 2, 4, 4).permute(0, 2, 4, 1, 5, 3)
            codes = c[..., 0] | (c[..., 1] << 4)                  # (g, b, j, r, t)
        else:
            # (g, r, b, j, t): column 32b + 4j + t -> vector j, byte 4r + t.
            codes = codes.view(groups, GROUP_ROWS, blocks, 8, 4).permute(0, 2, 3, 1, 4)
        return cls(rows.format, out_features, in_features,
                   codes.reshape(groups, blocks, -1).contiguous(),
                   _group_major(rows.scales, padded), _group_major(rows.mins, padded))


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    """fp16 scales as fp32 divisors: an all-zero block divides by 1 (its codes come out 0)."""
    scales = scales.float()
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _group_major(t: torch.Tensor | None, padded: int) -> torch.Tensor | None:
    """(rows, blocks) -> (groups, blocks, 16)."""
    if t is None:
        return None
    t = _pad_rows(t, padded)
    return t.view(padded // GROUP_ROWS, GROUP_ROWS, -1).transpose(1, 2).contiguous()
