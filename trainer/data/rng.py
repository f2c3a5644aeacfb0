"""Counter-based random numbers on int64 torch tensors.

Every random number in the synthetic data set is a pure function of a key (an
int naming the stream: seed, split, purpose, feature) and integer counters (the
global sample index, the feature slot, ...). Nothing is drawn from a stateful
generator, so a sample is the same whichever rank reads it, in whatever order,
with whatever batch size.

The mixer is splitmix64's finaliser. torch has no uint64 arithmetic, so it runs
on int64: multiplication wraps modulo 2**64 exactly like the unsigned version,
but ``>>`` is arithmetic on negative numbers, so logical shifts mask the sign
extension off.

Example::

    key = stream_key(0, "train", "dense")
    idx = torch.arange(4)
    uniform(key, idx)                     # float64 in (0, 1), shape [4]
    normal(key, idx[:, None], torch.arange(3))  # shape [4, 3]
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """Reinterprets an unsigned 64-bit constant as the int64 torch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN_I64 = _signed(_GOLDEN)
_MUL1_I64 = _signed(_MUL1)
_MUL2_I64 = _signed(_MUL2)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    # Arithmetic shift copies the sign bit into the top `bits` bits; mask them off.
    shifted = x >> bits
    shifted &= (1 << (64 - bits)) - 1
    return shifted


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 of each int64 element (bit-identical to the uint64 reference)."""
    # In place after the first add (which copies): the hashing is most of the
    # synthetic batch's cost, and fresh temporaries for every step of it showed.
    x = x + _GOLDEN_I64
    shifted = torch.empty_like(x)  # one scratch buffer for the three shifts
    for bits, multiplier in ((30, _MUL1_I64), (27, _MUL2_I64), (31, None)):
        torch.bitwise_right_shift(x, bits, out=shifted)
        shifted &= (1 << (64 - bits)) - 1  # logical shift: drop the copied sign bits
        x ^= shifted
        if multiplier is not None:
            x *= multiplier
    return x


def mix64_int(x: int) -> int:
    """The same mixer on a Python int, returned as unsigned 64-bit."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def stream_key(seed: int, *names: str | int) -> int:
    """Folds a seed and stream labels into one key (as an int64 value)."""
    h = mix64_int(seed & _MASK64)
    for name in names:
        # Strings are folded by their UTF-8 bytes so the key never depends on
        # Python's randomised str hash.
        part = int.from_bytes(name.encode(), "little") if isinstance(name, str) else name
        h = mix64_int(h ^ (part & _MASK64))
    return _signed(h)


def hash_counters(key: int, *counters: torch.Tensor | int) -> torch.Tensor:
    """One well-mixed int64 per element of the broadcast of ``counters``.

    Runs on the device of the first counter that is not on the CPU (CPU counters,
    e.g. a small ``arange``, are copied there), so a generator whose sample
    indices live on a GPU draws there, bit-identical to the CPU.
    """
    device = next(
        (c.device for c in counters if isinstance(c, torch.Tensor) and c.device.type != "cpu"),
        None,
    )
    h: torch.Tensor | None = None
    for counter in counters:
        c = torch.as_tensor(counter, dtype=torch.int64, device=device)
        h = mix64(c ^ key) if h is None else mix64(h ^ c)
    assert h is not None, "hash_counters needs at least one counter"
    return h


def uniform(key: int, *counters: torch.Tensor | int) -> torch.Tensor:
    """float64 uniforms in the open interval (0, 1), 53 random bits each."""
    return to_uniform(hash_counters(key, *counters))


def to_uniform(hashes: torch.Tensor) -> torch.Tensor:
    """The uniforms ``uniform`` makes of int64 hashes (so that a caller can hash
    its counters in stages: ``uniform(k, a, b) == to_uniform(mix64(hash_counters(k, a) ^ b))``)."""
    bits = _shr(hashes, 11)
    return bits.to(torch.float64).add_(0.5).mul_(2.0**-53)  # in place: the same bits


def normal(key: int, *counters: torch.Tensor | int) -> torch.Tensor:
    """float64 standard normals (Box-Muller on the two 32-bit halves of a hash)."""
    h = hash_counters(key, *counters)
    u1 = (_shr(h, 32).to(torch.float64) + 0.5) * 2.0**-32
    u2 = ((h & 0xFFFFFFFF).to(torch.float64) + 0.5) * 2.0**-32
    return box_muller(u1, u2)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """``normal``'s normals from its two uniforms (a compiled hash may supply them)."""
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
