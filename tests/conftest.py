import pytest
import torch


def pytest_configure(config):
    # One cache folder for the session (prepared models are shared between tests; the user's
    # own cache is never touched), and no background compiles outliving a test. Set in the
    # environment so that the command lines tests start inherit it too.
    import os
    import tempfile

    os.environ["ARCHOPT_CACHE"] = tempfile.mkdtemp(prefix="archopt-test-cache-")
    os.environ["ARCHOPT_BACKGROUND_COMPILE"] = "0"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine weights, so folding and key maps are really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_(1.0, 0.2)
                    m.bias.normal_(0, 0.2)
    return model
