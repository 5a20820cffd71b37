"""Pair accessors for the FP8 kernels: every lane moves two consecutive elements per step.

A kernel array is passed twice: as elements and as "words" of two elements (fp32 pairs as int64,
bf16 pairs as uint32, FP8 code pairs as uint16), so a warp step is one coalesced 8/4/2-byte access
per lane. When an array is not aligned for words (a chunk at an odd element offset) or is fp16, the
"wide" flag is off and the pair is two scalar accesses. Pair p holds elements 2p and 2p+1; the words
cover the first n // 2 pairs, the odd last element (if any) goes through the element view.
int64 (not uint64) words: numba types uint64 & int64 as float64.
"""
import numpy as np

from .device import bits_f32, device_fn, f32_bits
from .fp8_bits import bf16_bits_from_f32_bits

__all__ = ["pair_loader", "pair_storer", "code_pair_loader", "code_pair_storer", "word_dtype"]

_bf16_round = device_fn(bf16_bits_from_f32_bits)


def word_dtype(kind):
    """NumPy dtype of a two-element word for a value kind ('f32', 'bf16'), or 'u8' codes; None: no words."""
    return {"f32": np.int64, "bf16": np.uint32, "u8": np.uint16}.get(kind)


def _element_loader(kind):
    if kind == "bf16":
        def load(a, i):
            return bits_f32(np.int64(a[i]) << 16)
    else:
        def load(a, i):
            return np.float32(a[i])
    return device_fn(load)


def _element_storer(kind):
    if kind == "bf16":
        def store(a, i, v):
            a[i] = _bf16_round(f32_bits(v))
    elif kind == "f16":
        def store(a, i, v):
            a[i] = np.float16(v)
    else:
        def store(a, i, v):
            a[i] = v
    return device_fn(store)


def pair_loader(kind, wide):
    """load(elems, words, p, n, full) -> (fp32 of element 2p, of 2p+1), 0 beyond n. ``full``: the
    caller knows pair p is inside the word range (a warp-uniform flag: no per-pair bounds check)."""
    load1 = _element_loader(kind)
    zero = np.float32(0.0)

    def load_tail(e, p, n):
        a, b = zero, zero
        if 2 * p < n:
            a = load1(e, 2 * p)
        if 2 * p + 1 < n:
            b = load1(e, 2 * p + 1)
        return a, b

    if wide and kind == "f32":
        def load(e, w, p, n, full):
            if full or p < (n >> 1):
                word = w[p]
                return bits_f32(word & 0xFFFFFFFF), bits_f32((word >> 32) & 0xFFFFFFFF)
            return load_tail(e, p, n)
    elif wide and kind == "bf16":
        def load(e, w, p, n, full):
            if full or p < (n >> 1):
                word = np.int64(w[p])
                return bits_f32((word & 0xFFFF) << 16), bits_f32(word & 0xFFFF0000)
            return load_tail(e, p, n)
    else:
        def load(e, w, p, n, full):
            if full:
                return load1(e, 2 * p), load1(e, 2 * p + 1)
            return load_tail(e, p, n)
    load_tail = device_fn(load_tail)
    return device_fn(load)


def pair_storer(kind, wide):
    """store(elems, words, p, n, full, a, b): elements 2p, 2p+1 (those below n) = a, b, rounded to the kind."""
    store1 = _element_storer(kind)

    def store_tail(e, p, n, a, b):
        if 2 * p < n:
            store1(e, 2 * p, a)
        if 2 * p + 1 < n:
            store1(e, 2 * p + 1, b)

    if wide and kind == "f32":
        def store(e, w, p, n, full, a, b):
            if full or p < (n >> 1):
                hi = f32_bits(b)
                if hi >= 0x80000000:         # keep the int64 word in range (the simulator checks)
                    hi -= 0x100000000
                w[p] = (hi << 32) | f32_bits(a)
            else:
                store_tail(e, p, n, a, b)
    elif wide and kind == "bf16":
        def store(e, w, p, n, full, a, b):
            if full or p < (n >> 1):
                w[p] = (_bf16_round(f32_bits(b)) << 16) | _bf16_round(f32_bits(a))
            else:
                store_tail(e, p, n, a, b)
    else:
        def store(e, w, p, n, full, a, b):
            if full:
                store1(e, 2 * p, a)
                store1(e, 2 * p + 1, b)
            else:
                store_tail(e, p, n, a, b)
    store_tail = device_fn(store_tail)
    return device_fn(store)


def code_pair_loader(wide):
    """load(codes, code_words, p, n, full) -> (code 2p, code 2p+1) as ints, 0 beyond n."""
    def load_tail(e, p, n):
        a, b = np.int64(0), np.int64(0)
        if 2 * p < n:
            a = np.int64(e[2 * p])
        if 2 * p + 1 < n:
            b = np.int64(e[2 * p + 1])
        return a, b

    if wide:
        def load(e, w, p, n, full):
            if full or p < (n >> 1):
                word = np.int64(w[p])
                return word & 0xFF, word >> 8
            return load_tail(e, p, n)
    else:
        def load(e, w, p, n, full):
            return load_tail(e, p, n)
    load_tail = device_fn(load_tail)
    return device_fn(load)


def code_pair_storer(wide):
    """store(codes, code_words, p, n, full, c0, c1): FP8 codes 2p, 2p+1 (those below n)."""
    def store_tail(e, p, n, a, b):
        if 2 * p < n:
            e[2 * p] = a
        if 2 * p + 1 < n:
            e[2 * p + 1] = b

    if wide:
        def store(e, w, p, n, full, a, b):
            if full or p < (n >> 1):
                w[p] = (b << 8) | a
            else:
                store_tail(e, p, n, a, b)
    else:
        def store(e, w, p, n, full, a, b):
            store_tail(e, p, n, a, b)
    store_tail = device_fn(store_tail)
    return device_fn(store)
