"""``evaluate``'s config checks of the safety signal's decoding."""

import copy

import pytest

from configs.evaluate import get_config
from experiments import evaluate
from ssah_jax.runs import ConfigError


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_a_signal_threshold_outside_0_1_names_its_key(threshold):
    config = get_config("quick")
    evaluate.validate(config)
    config = copy.deepcopy(config)
    config.signal.threshold = threshold
    with pytest.raises(ConfigError, match=r"^config\.signal\.threshold=.*: must be a probability in \[0, 1\]$"):
        evaluate.validate(config)
