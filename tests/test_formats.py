"""Group-sparse format: exact round trips, group rules, and size accounting."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_scalpel import FormatError
from tvm_scalpel import formats as F


def _pruned(rng, out, k, w, density):
    weight = rng.standard_normal((out, k)).astype("float32")
    keep = rng.random((out, -(-k // w))) < density
    return F.encode(weight, w, keep=keep).to_dense(), keep


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), k=st.integers(1, 70), w=st.sampled_from([1, 2, 4, 8, 16]),
       density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_round_trip_and_structure(out, k, w, density, seed):
    rng = np.random.default_rng(seed)
    dense, keep = _pruned(rng, out, k, w, density)
    g = F.encode(dense, w)
    np.testing.assert_array_equal(g.to_dense(), dense)
    assert g.values.shape == (g.n_groups, w) and g.row_ptr.shape == (out + 1,)
    assert g.row_ptr[0] == 0 and g.row_ptr[-1] == g.n_groups
    assert np.all(np.diff(g.row_ptr) >= 0)
    # Indices are block columns, sorted within each row, and point at groups with a nonzero.
    for r in range(out):
        cols = g.col_idx[g.row_ptr[r]:g.row_ptr[r + 1]]
        assert np.all(np.diff(cols) > 0) and np.all(cols < -(-k // w))
    np.testing.assert_array_equal(F.group_mask(dense, w).sum(), g.n_groups)
    # Padding of a ragged last group stays zero.
    if k % w:
        last = g.values[g.col_idx == k // w]
        assert np.all(last[:, k % w:] == 0)


def test_empty_rows_dense_rows_all_zero_and_ragged():
    w = 4
    weight = np.arange(1, 31, dtype="float32").reshape(3, 10)  # 10 % 4 != 0
    weight[1] = 0  # an empty row
    g = F.encode(weight, w)
    assert list(g.row_ptr) == [0, 3, 3, 6]  # rows 0 and 2 fully dense: 3 groups each
    np.testing.assert_array_equal(g.to_dense(), weight)
    assert np.all(g.values[2, 2:] == 0)  # ragged group padded with zeros
    z = F.encode(np.zeros((5, 9), "float32"), 8)
    assert z.n_groups == 0 and list(z.row_ptr) == [0] * 6
    np.testing.assert_array_equal(z.to_dense(), np.zeros((5, 9), "float32"))


def test_unaligned_sparsity_keeps_any_group_with_a_nonzero():
    weight = np.zeros((1, 16), "float32")
    weight[0, 5] = 3.0  # one nonzero inside group 1 at w=4
    g = F.encode(weight, 4)
    assert list(g.col_idx) == [1] and list(g.values[0]) == [0, 3.0, 0, 0]


def test_conv_weights_are_flattened_per_filter():
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((6, 3, 5, 5)).astype("float32")
    assert F.flatten_per_filter(conv).shape == (6, 75)
    g = F.encode(conv, 8)
    assert g.shape == (6, 75)
    np.testing.assert_array_equal(g.to_dense().reshape(conv.shape), conv)


def test_group_rms_matches_definition_including_ragged_group():
    weight = np.array([[3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 2.0]], "float32")
    rms = F.group_rms(weight, 4)
    np.testing.assert_allclose(rms, [[np.sqrt(25 / 4), np.sqrt(6 / 3)]])


def test_size_accounting_index_share_is_one_over_w_plus_one():
    rng = np.random.default_rng(1)
    w = 8
    dense, _ = _pruned(rng, 300, 784, w, 0.1)
    g = F.encode(dense, w)
    s = g.sizes(value_bytes=4, index_bytes=4)
    assert s.values == g.n_groups * w * 4
    assert s.indices == g.n_groups * 4
    assert s.row_pointers == 301 * 4
    assert s.total == s.values + s.indices + s.row_pointers
    assert s.index_fraction == pytest.approx(1 / (w + 1))
    table = F.size_table(dense, w)
    assert table["dense"].total == 300 * 784 * 4
    csr = table["csr"]
    assert csr.index_fraction == pytest.approx(0.5)  # one int32 index per fp32 value
    nnz = int(np.count_nonzero(dense))
    assert csr.total == nnz * 8 + 301 * 4
    # The group format needs fewer bytes than CSR whenever groups are at least ~half full.
    assert table["group"].total < csr.total


def test_csr_round_trip():
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((7, 13)).astype("float32") * (rng.random((7, 13)) < 0.3)
    c = F.encode_csr(dense)
    assert c.nnz == np.count_nonzero(dense)
    np.testing.assert_array_equal(c.to_dense(), dense)


def test_encoded_arrays_are_read_only_and_input_untouched():
    weight = np.ones((2, 8), "float32")
    before = weight.copy()
    g = F.encode(weight, 4)
    np.testing.assert_array_equal(weight, before)
    with pytest.raises(ValueError):
        g.values[0, 0] = 5.0


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: F.encode(np.ones((2, 8)), 0), "positive int"),
        (lambda: F.encode(np.ones(8), 4), "2-D"),
        (lambda: F.encode(np.ones((2, 8)), 4, keep=np.ones((2, 3), bool)), r"expected shape \(2, 2\)"),
        (lambda: F.encode(np.ones((2, 8)), 4, index_dtype="int8"), "index_dtype"),
        (lambda: F.encode(np.ones((0, 8)), 4), "non-empty"),
    ],
)
def test_bad_input_errors(call, fragment):
    with pytest.raises(FormatError, match=fragment):
        call()
