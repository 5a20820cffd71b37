"""Quad accessors for the FP8 kernels: every lane moves four consecutive elements per step."""
# Quad q holds elements 4q..4q+3. Values come back as fp32 whatever the array holds (fp32, fp16, or
# bf16 as uint16 bits); FP8 codes come back as one int64 word, element 4q in the low byte.
# ``vector=True``: one aligned vector access per quad (16 bytes of fp32, 8 of fp16/bf16, 4 of codes),
# for arrays whose address is a multiple of the quad (``intrinsics.aligned4``); else four scalar
# accesses (a chunk at an odd offset inside a user array). The ``*_tail`` forms take ``n`` and touch
# only elements below it (reading 0 beyond): they serve the one partial tile at the end of an array.

import numpy as np

from ringlab.kernels.device import bits_f32, device_fn
from ringlab.kernels.intrinsics import (bf16_rounder, load4, load_u8x4, scalar_load4, scalar_load_u8x4, scalar_store4,
                         scalar_store_u8x4, store4, store_u8x4)

__all__ = ["quad_loader", "quad_storer", "code_quad_loader", "code_quad_storer"]

def _widen(kind):
    if kind == "bf16":
        def widen(v):
            return bits_f32(np.int64(v) << 16)
    else:
        def widen(v):
            return np.float32(v)
    return device_fn(widen)


def _narrow(kind):
    if kind == "bf16":
        round_bf16 = bf16_rounder()

        def narrow(v):
            return np.uint16(round_bf16(v))
    elif kind == "f16":
        def narrow(v):
            return np.float16(v)
    else:
        def narrow(v):
            return np.float32(v)
    return device_fn(narrow)


def quad_loader(kind, vector):
    """(load(a, q) -> 4 x fp32, load_tail(a, q, n) -> 4 x fp32 with elements >= n read as 0)."""
    widen = _widen(kind)
    zero = np.float32(0.0)
    load4_any = load4 if vector else scalar_load4

    def load(a, q):
        v0, v1, v2, v3 = load4_any(a, q)
        return widen(v0), widen(v1), widen(v2), widen(v3)

    def load_tail(a, q, n):
        i = 4 * q
        v0 = widen(a[i]) if i < n else zero
        v1 = widen(a[i + 1]) if i + 1 < n else zero
        v2 = widen(a[i + 2]) if i + 2 < n else zero
        v3 = widen(a[i + 3]) if i + 3 < n else zero
        return v0, v1, v2, v3
    return device_fn(load), device_fn(load_tail)


def quad_storer(kind, vector):
    """(store(a, q, v0, v1, v2, v3), store_tail(a, q, n, v0, v1, v2, v3)): fp32 values rounded to the kind."""
    narrow = _narrow(kind)
    store4_any = store4 if vector else scalar_store4

    def store(a, q, v0, v1, v2, v3):
        store4_any(a, q, narrow(v0), narrow(v1), narrow(v2), narrow(v3))

    def store_tail(a, q, n, v0, v1, v2, v3):
        i = 4 * q
        if i < n:
            a[i] = narrow(v0)
        if i + 1 < n:
            a[i + 1] = narrow(v1)
        if i + 2 < n:
            a[i + 2] = narrow(v2)
        if i + 3 < n:
            a[i + 3] = narrow(v3)
    return device_fn(store), device_fn(store_tail)


def code_quad_loader(vector):
    """(load(codes, q) -> int64 word of codes 4q..4q+3, load_tail(codes, q, n): codes >= n read as 0)."""
    load_word = load_u8x4 if vector else scalar_load_u8x4

    def load(a, q):
        return np.int64(load_word(a, q))

    def load_tail(a, q, n):
        i = 4 * q
        w = np.int64(0)
        for k in range(4):
            if i + k < n:
                w |= np.int64(a[i + k]) << (8 * k)
        return w
    return device_fn(load), device_fn(load_tail)


def code_quad_storer(vector):
    """(store(codes, q, word), store_tail(codes, q, n, word)): codes 4q..4q+3 from a word, low byte first."""
    store = store_u8x4 if vector else scalar_store_u8x4

    def store_tail(a, q, n, w):
        i = 4 * q
        for k in range(4):
            if i + k < n:
                a[i + k] = (w >> (8 * k)) & 0xFF
    return store, device_fn(store_tail)
