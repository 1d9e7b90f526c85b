"""A kernel Rule names its hyper-parameters: a misordered, missing or misnamed one fails when the rule is made."""
import pytest

pytest.importorskip("triton")

from fused_optim.kernels import multi_tensor as mt  # noqa: E402
from fused_optim.optimizers import adam, common  # noqa: E402

HYPERS = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01)  # what adam_scalars / the update read, in order


def _rule(hypers):
    return mt.Rule(adam._adam_update, common.adam_scalars, 0, hypers)


def test_rule_takes_the_named_slots_in_order():
    rule = _rule(HYPERS)
    assert rule.hyper_values() == (1e-3, 0.9, 0.999, 1e-8, 0.01, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("hypers, slot", [
    (dict(lr=1e-3, beta2=0.999, beta1=0.9, eps=1e-8, wd=0.01), "beta1"),  # misordered
    (dict(lr=1e-3, beta1=0.9, beta2=0.999, wd=0.01), "eps"),              # missing
    (dict(lr=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8, wd=0.01), "eps"),  # misnamed
])
def test_bad_hypers_fail_at_construction_every_time(hypers, slot):
    for _ in range(2):  # the check is cached per (function, names): a failure must not be
        with pytest.raises(ValueError, match=f"slot \\d as '{slot}'"):
            _rule(hypers)


def test_lr_first_and_at_most_eight():
    with pytest.raises(ValueError, match="lr and up to 7"):
        mt.Rule(adam._adam_update, common.adam_scalars, 0, dict(beta1=0.9, lr=1e-3))
    with pytest.raises(ValueError, match="lr and up to 7"):
        mt.Rule(adam._adam_update, None, 0, {"lr": 1, **{f"h{i}": 0 for i in range(1, 9)}})
