"""Masked reductions and the two loss aggregations (remax/algo/masked.py)."""

from __future__ import annotations

import pytest
import torch

from remax.algo import AGGREGATIONS, lookup
from remax.algo.masked import masked_mean, masked_sum, masked_whiten, seq_sum, token_mean
from remax.algo.types import Aggregation

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
M = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_and_mean_hand_values():
    # valid entries: row 0 -> 1, 2; row 1 -> 4
    assert masked_sum(X, M).item() == 7.0  # 1 + 2 + 4
    assert masked_mean(X, M).item() == pytest.approx(7.0 / 3.0, rel=1e-15)
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0], dtype=X.dtype))
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0], dtype=X.dtype))
    # column 2 is fully masked: its mean is 0, not NaN
    torch.testing.assert_close(
        masked_mean(X, M, dim=0), torch.tensor([2.5, 2.0, 0.0], dtype=X.dtype)
    )


def test_masked_positions_do_not_matter_for_value_or_gradient():
    garbage = X.clone()
    garbage[~M] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=X.dtype)
    garbage.requires_grad_(True)
    for fn in (masked_sum, masked_mean):
        garbage.grad = None
        out = fn(garbage, M)
        assert out.item() == fn(X, M).item()
        out.backward()
        assert torch.isfinite(garbage.grad).all()
        assert (garbage.grad[~M] == 0).all()


def test_empty_mask_gives_zero_not_nan_with_defined_gradient():
    x = X.clone().requires_grad_(True)
    empty = torch.zeros_like(M)
    out = masked_mean(x, empty)
    out.backward()
    assert out.item() == 0.0
    assert (x.grad == 0).all()
    assert masked_sum(x, empty).item() == 0.0
    assert (masked_whiten(x, empty) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    x = X.to(dtype)
    assert masked_sum(x, M).dtype == dtype
    assert masked_mean(x, M, dim=1).dtype == dtype
    assert masked_whiten(x, M).dtype == dtype
    assert token_mean(values=x, mask=M).dtype == dtype
    assert seq_sum(values=x, mask=M, denominator=3.0).dtype == dtype


def test_masked_whiten_mean_zero_unit_variance_and_masked_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.rand(4, 7, generator=g) > 0.3
    w = masked_whiten(x, mask, eps=0.0)
    # float64 moments of ~20 numbers: exact up to a few ulps
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-14)
    assert masked_mean(w.square(), mask).item() == pytest.approx(1.0, rel=1e-13)
    assert (w[~mask] == 0).all()
    # a single valid entry has variance 0: it maps to 0 (eps keeps the scale finite)
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert masked_whiten(x, one)[0, 0].item() == 0.0


def test_aggregations_hand_values_and_denominator():
    # valid: row 0 -> 1, 2; row 1 -> 4; 3 tokens, 2 rows
    assert token_mean(values=X, mask=M).item() == pytest.approx(7.0 / 3.0, rel=1e-15)
    assert seq_sum(values=X, mask=M).item() == pytest.approx(7.0 / 2.0, rel=1e-15)
    assert token_mean(values=X, mask=M, denominator=10.0).item() == pytest.approx(0.7, rel=1e-15)
    den = torch.tensor(14.0, dtype=torch.float64)
    assert seq_sum(values=X, mask=M, denominator=den).item() == pytest.approx(0.5, rel=1e-15)
    # a global count of 0 (every rank empty) gives 0, never NaN
    empty = torch.zeros_like(M)
    zero_den = torch.tensor(0.0, dtype=torch.float64)
    assert token_mean(values=X, mask=empty, denominator=zero_den).item() == 0.0
    with pytest.raises(ValueError, match="denominator must be > 0, got 0"):
        token_mean(values=X, mask=M, denominator=0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mask shape"):
        masked_sum(X, M[:, :2])


def test_aggregation_registry_accepts_strings_and_enums():
    assert lookup(AGGREGATIONS, "token_mean") is token_mean
    assert lookup(AGGREGATIONS, Aggregation.seq_sum) is seq_sum
    assert set(AGGREGATIONS) == set(Aggregation)
    with pytest.raises(ValueError, match="'seq_sum', 'token_mean'"):
        lookup(AGGREGATIONS, "mean")
