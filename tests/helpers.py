"""Small helpers shared by the test files (imported as ``helpers``; tests/ is on sys.path)."""

from torch import nn


def randomize_bns(module: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding is really tested."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return module
