"""fms.bench.timing's interval for a median, against published order-statistic ranks."""

import pytest

from fms.bench.timing import median_interval


@pytest.mark.parametrize("n, ranks", [(6, (1, 6)), (10, (2, 9)), (21, (6, 16)), (30, (10, 21))])
def test_median_interval_takes_the_tabulated_order_statistics(n, ranks):
    # 95% distribution-free intervals for a median: ranks (k, n + 1 - k) from binomial(n, 1/2) tables
    values = [10.0 * i for i in range(n, 0, -1)]  # unsorted on purpose; the i-th smallest is 10 * i
    assert median_interval(values) == (10.0 * ranks[0], 10.0 * ranks[1])


def test_median_interval_needs_six_values_at_95_percent_and_a_valid_confidence():
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.9) == (1.0, 5.0)
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match=f"confidence must be in \\(0, 1\\), got {bad!r}"):
            median_interval([1.0] * 10, confidence=bad)
