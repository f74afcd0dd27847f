"""Conformance of the OPT layers and the training CLI with the released OPT code as docs/methods.md and
docs/training.md describe it: what an audit against that description found and fixed (the maps' match
with the released constructions at small d is tests/test_nn.py::test_maps_match_released_constructions)."""
import math

import torch

from opt_fast.nn import OPTLinear
from opt_fast.train import TrainConfig, train
from opt_fast.train import core


def test_householder_qr_is_orthogonal_at_cnn6_sizes_in_float32():
    # The det of a float32 orthogonal 576 x 576 matrix underflows to -0.0 (a product of LU pivots); its sign 0
    # used to zero R's last column, so R was singular for every released (N(0, 1)) P of CNN-6's layers.
    torch.manual_seed(0)
    d = 576
    layer = OPTLinear(d, 4, bias=False, method="householder_qr")
    R = layer.rotation().detach()
    err = torch.linalg.matrix_norm(R.mT @ R - torch.eye(d)) / math.sqrt(d)
    assert err < 1e-5, f"householder_qr: ||RᵀR - I||_F/sqrt(d) = {float(err):.3g} at d = {d}"
    assert float(torch.linalg.slogdet(R.double()).sign) == (-1.0) ** (d - 1)


def test_stochastic_episode_is_tested_before_its_merge_and_bn_reset(monkeypatch):
    # Released sopt_gs: test once per episode, then merge (and, at the start of the next episode, reset the
    # BatchNorms). With --reset-bn the CLI used to resample first, so each test saw freshly reset BatchNorms.
    events = []
    evaluate, resample = core.evaluate, core.resample

    def logged_evaluate(*args, **kwargs):
        events.append("test")
        return evaluate(*args, **kwargs)

    def logged_resample(*args, **kwargs):
        events.append("resample")
        return resample(*args, **kwargs)

    monkeypatch.setattr(core, "evaluate", logged_evaluate)
    monkeypatch.setattr(core, "resample", logged_resample)
    train(TrainConfig(dataset="synthetic", model="small", epochs=2, batch_size=128, method="gram_schmidt",
                      progress=False, bn_momentum=0.1, threads=1, stochastic=0.5, episode_epochs=1, reset_bn=True))
    assert events[:3] == ["test", "resample", "test"], events
