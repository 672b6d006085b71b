"""ExactSum's digit extraction (issue 12): the float-summed digits stay exact beyond one float-summable batch of
rows, and an add whose entries need the two-factor scaling (terms below 2^-900) gives every entry the sum it gets
alone. References: closed forms and rational arithmetic."""
import math
from fractions import Fraction

import torch

from pyro_cpa.infer.distributed import _FLOAT_SUM_ROWS, ExactSum, exact_sum


def test_digit_sums_exact_beyond_one_float_batch():
    """n > _FLOAT_SUM_ROWS copies of terms whose top digit is 2^32 − 1: that digit's sum exceeds 2^53 (one float sum
    of all rows' digits would round), the exact total is n · v."""
    n = _FLOAT_SUM_ROWS + 3
    v = math.ldexp(2 ** 53 - 1, 43)                   # 53 ones right below 2^96
    w = -math.ldexp(2 ** 53 - 1, -60)                 # small, negative: digits in the lowest slots of its entry
    vals = torch.tensor([v, w, 1.0], dtype=torch.float64).expand(n, 3).contiguous()
    out = ExactSum(3).add(vals).value()
    for j, x in enumerate((v, w, 1.0)):
        assert Fraction(float(out[j])) == Fraction(float(Fraction(x) * n))   # one rounding of the exact n · x


def test_tiny_entries_beside_normal_ones():
    """Entries at the bottom of the range (subnormal terms: 2^-base is no float) in the same add as ordinary ones:
    every entry equals its own sum and the rational reference."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(50, 4, generator=g, dtype=torch.float64)
    v[:, 0] *= 5e-324 * 2 ** 20                       # subnormal multiples of the smallest float
    v[:, 1] *= 1e300
    v[:, 3] *= 1e-310
    together = ExactSum(4).add(v).value()
    for j in range(4):
        assert torch.equal(together[j], exact_sum(v[:, j]))
        ref = sum((Fraction(float(t)) for t in v[:, j]), Fraction(0))
        bound = 50 * 2.0 ** -64 * float(v[:, j].abs().max()) + 3 * math.ulp(abs(float(ref)))
        assert abs(Fraction(float(together[j])) - ref) <= Fraction(bound)
