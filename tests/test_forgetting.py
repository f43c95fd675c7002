"""ACC/BWT/FWT/forgetting against values computed by hand."""

import pytest

from plait.forgetting import continual_metrics
from registry.errors import BadInputError

# accuracies: 3 domains; R[i][j] after stage i on domain j (None: not measured)
R_ACC = [[0.80, 0.30, 0.20],
         [0.70, 0.90, 0.25],
         [0.60, 0.85, 0.95]]
BASE_ACC = [0.10, 0.20, 0.30]


def test_accuracy_matrix_by_hand():
    m = continual_metrics(R_ACC, ["a", "b", "c"], higher_is_better=True, base=BASE_ACC)
    assert m.acc == pytest.approx((0.60 + 0.85 + 0.95) / 3)
    # forgetting_j = R[j][j] - R[2][j]: a: 0.80-0.60, b: 0.90-0.85
    assert m.forgetting == pytest.approx({"a": 0.20, "b": 0.05})
    assert m.bwt == pytest.approx(((0.60 - 0.80) + (0.85 - 0.90)) / 2)
    # FWT = mean_j>=1 R[j-1][j] - b_j: (0.30-0.20) + (0.25-0.30)
    assert m.fwt == pytest.approx(((0.30 - 0.20) + (0.25 - 0.30)) / 2)
    assert m.max_forgetting == pytest.approx(0.20)


def test_loss_matrix_is_signed_so_positive_forgetting_is_worse():
    R_LOSS = [[2.0, None], [2.5, 1.5]]  # loss on domain a rose from 2.0 to 2.5: forgetting 0.5
    m = continual_metrics(R_LOSS, ["a", "b"], higher_is_better=False)
    assert m.forgetting == {"a": 0.5} and m.bwt == -0.5 and m.acc == 2.0 and m.fwt is None


def test_zero_forgetting_when_rows_repeat():
    R = [[1.2, None, None], [1.2, 0.9, None], [1.2, 0.9, 1.1]]
    m = continual_metrics(R, ["a", "b", "c"], higher_is_better=False)
    assert m.forgetting == {"a": 0.0, "b": 0.0} and m.bwt == 0.0


def test_single_domain_and_bad_shapes():
    m = continual_metrics([[0.5]], ["a"], higher_is_better=True)
    assert (m.acc, m.bwt, m.forgetting) == (0.5, None, {})
    with pytest.raises(BadInputError, match="has 1 rows for 2 domains"):
        continual_metrics([[0.5]], ["a", "b"], higher_is_better=True)
    with pytest.raises(BadInputError, match=r"no value at R\[1\]\[0\]"):
        continual_metrics([[0.5, None], [None, 0.4]], ["a", "b"], higher_is_better=True)


def test_a_one_stage_system_has_acc_only():
    from plait.forgetting import final_stage_metrics

    m = final_stage_metrics([2.0, 3.0, 4.5], ["a", "b", "c"], higher_is_better=False)
    assert m.acc == pytest.approx(9.5 / 3)
    assert (m.bwt, m.fwt, m.forgetting, m.max_forgetting) == (None, None, {}, None)
    with pytest.raises(BadInputError, match="the row has 2 values for 3 domains"):
        final_stage_metrics([2.0, 3.0], ["a", "b", "c"], higher_is_better=False)
    with pytest.raises(BadInputError, match=r"no value at R\[0\]\[1\]"):
        final_stage_metrics([2.0, None], ["a", "b"], higher_is_better=False)
