"""calibration.compile: Hessians captured through torch.compile equal the eager ones (fp32 round-off)."""

import pytest

from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.compiled import compiled
from obsdiff.calibration.prompts import tiny_prompts
from obsdiff.calibration.timesteps import StepTracker, timestep_weights
from obsdiff.prune import Calibration, calibrate

pytestmark = pytest.mark.slow


class NoProgress:
    def update(self, n):
        pass


def hessians(adapter, pipe, calib, groups, compile):
    tracker = StepTracker(calib.timestep_weights)
    with capture_hessians(pipe.transformer, groups, tracker) as found, compiled(pipe.transformer, compile):
        calibrate(adapter, pipe, calib, tracker, NoProgress())
    return found


def test_compiled_calibration_gives_the_eager_hessians_package_after_package(tiny_pipe):
    adapter, pipe = tiny_pipe
    calib = Calibration(adapter.encode(pipe, tiny_prompts()[:2], 7.0, 2), [0, 1], 2, 7.0, 32, 2,
                        timestep_weights("log_decrease", 2))  # fmt: skip
    units = adapter.units(pipe.transformer, None, adapter.default_targets)
    by_block = {}
    for unit in units:
        for group in unit:
            by_block.setdefault(int(group[0].split(".")[1]), []).append(group)
    # a later block first: code compiled for unhooked blocks of its class must not run it unhooked
    for groups in (by_block[2], by_block[0]):
        eager = hessians(adapter, pipe, calib, groups, compile=False)
        fast = hessians(adapter, pipe, calib, groups, compile=True)
        for name, acc in eager.items():
            assert fast[name].num_calls == acc.num_calls > 0
            worst = float((fast[name].H - acc.H).abs().max() / acc.H.abs().max())
            assert worst < 1e-5, name
    assert pipe.transformer._compiled_call_impl is None  # eager again after calibration
