"""Feature networks load offline only: Inception without local weights is a clear error and
never a download attempt."""

import socket
import urllib.request

import pytest
import torch

from eval.features import INCEPTION_FILE, load_feature_network
from schedules.io import StepsmithError


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Fail loudly on any attempt to open a connection or fetch a URL; empty hub cache."""
    attempts = []

    def refuse(*args, **_kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.hub.set_dir(str(tmp_path / "torch_home" / "hub"))
    yield attempts
    torch.hub._hub_dir = None


def test_digits_features_loads_and_checks_shape():
    net = load_feature_network("digits-features")
    assert net.num_features == 128
    f = net(torch.zeros(3, 1, 16, 16))
    assert f.shape == (3, 128) and f.dtype == torch.float64
    with pytest.raises(StepsmithError, match=r"\[1, 16, 16\]"):
        net(torch.zeros(3, 3, 16, 16))
    assert len(net.weights_hash()) == 64


def test_inception_without_weights_is_a_clear_error_and_no_download(no_network):
    with pytest.raises(StepsmithError) as exc:
        load_feature_network("inception")
    msg = str(exc.value)
    assert "--inception-weights" in msg and "hub/checkpoints" in msg and "never downloads" in msg
    with pytest.raises(StepsmithError, match="no such file"):
        load_feature_network("inception", inception_weights="/nonexistent/inception.pth")
    assert no_network == []


def test_inception_with_weights_but_no_extra_is_a_clear_error(no_network, tmp_path):
    w = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE
    w.parent.mkdir(parents=True)
    w.write_bytes(b"not really weights")
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torch-fidelity is installed here; this checks the error without it")
    with pytest.raises(StepsmithError, match="stepsmith\\[inception\\]"):
        load_feature_network("inception")  # found in the hub cache, then the import fails
    with pytest.raises(StepsmithError, match="stepsmith\\[inception\\]"):
        load_feature_network("inception", inception_weights=w)
    assert no_network == []


def test_user_module_and_unknown_name():
    class Pool(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    net = load_feature_network(Pool())
    assert net.num_features is None
    assert net.probe(torch.zeros(2, 3, 8, 8)) == 3
    with pytest.raises(StepsmithError, match="unknown feature network"):
        load_feature_network("resnet")
