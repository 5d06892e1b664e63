"""The RRDB network of ESRGAN / Real-ESRGAN, and the state-dict layouts it is published in.

Why our own copy instead of ``spandrel``: spandrel 0.4.2 declares a torchvision dependency, and
torchvision has no build for our CPU torch 2.13. Installed with ``pip install --no-deps``, ``import
spandrel`` (and any ``spandrel.architectures.*`` submodule, which imports the package first) fails:
``spandrel/__helpers/main_registry.py`` imports every architecture, and LaMa's imports
``torchvision.transforms.functional`` (checked 2026-12, spandrel 0.4.2 + einops, no torchvision).
So the one architecture users put in ``models/ESRGAN`` is written here: ~60 lines, the same maths.

Layouts accepted (all converted to this module's names):

* old ESRGAN (``model.0.weight``, ``model.1.sub.N.RDBk.convj.0.weight``, upsampling convs at
  ``model.3``/``model.6``, then HR conv and last conv): the scale is 2 ** number of upsampling convs;
* BasicSR "new arch" (``conv_first``, ``RRDB_trunk.N.RDBk.convj``, ``trunk_conv``, ``upconv1/2``,
  ``HRconv``, ``conv_last``);
* Real-ESRGAN (``conv_first``, ``body.N.rdbk.convj``, ``conv_body``, ``conv_up1/2``, ``conv_hr``,
  ``conv_last``), including its x2/x1 variants that pixel-unshuffle the input (``conv_first`` takes
  4x or 16x the channels).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class RRDBLayoutError(ValueError):
    """The state dict is not an RRDB (ESRGAN) network in any layout we know."""


class ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


@dataclass(frozen=True)
class RRDBShape:
    in_nc: int
    out_nc: int
    nf: int
    gc: int
    nb: int
    n_upsample: int
    #: Real-ESRGAN x2 / x1 pixel-unshuffle their input by this factor first (1: none)
    unshuffle: int = 1

    @property
    def scale(self) -> int:
        return 2 ** self.n_upsample // self.unshuffle


class RRDBNet(nn.Module):
    def __init__(self, shape: RRDBShape):
        super().__init__()
        self.shape = shape
        self.conv_first = nn.Conv2d(shape.in_nc, shape.nf, 3, 1, 1)
        self.body = nn.ModuleList(RRDB(shape.nf, shape.gc) for _ in range(shape.nb))
        self.conv_body = nn.Conv2d(shape.nf, shape.nf, 3, 1, 1)
        self.conv_up = nn.ModuleList(nn.Conv2d(shape.nf, shape.nf, 3, 1, 1) for _ in range(shape.n_upsample))
        self.conv_hr = nn.Conv2d(shape.nf, shape.nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(shape.nf, shape.out_nc, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.shape.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] to ``(B, 3, H*scale, W*scale)``."""
        if self.shape.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.shape.unshuffle)
        fea = self.conv_first(x)
        trunk = fea
        for block in self.body:
            trunk = block(trunk)
        fea = fea + self.conv_body(trunk)
        for conv in self.conv_up:
            fea = F.leaky_relu(conv(F.interpolate(fea, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(fea), 0.2))


_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_BASICSR_RDB = re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)$")
_REAL_RDB = re.compile(r"^body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)$")


def canonical_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """*state* renamed to :class:`RRDBNet`'s parameter names; RRDBLayoutError if it is no RRDB layout."""
    for prefix in ("params_ema", "params"):  # BasicSR training checkpoints wrap the weights
        if isinstance(state.get(prefix), dict):
            state = state[prefix]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "model.0.weight" in state:
        return _from_old(state)
    if "conv_first.weight" in state:
        return _from_named(state)
    raise RRDBLayoutError("not an ESRGAN (RRDB) model: expected 'model.0.weight' (ESRGAN) or 'conv_first.weight' "
                          f"(BasicSR / Real-ESRGAN) among its keys, found e.g. {sorted(state)[:3]}")


def _from_old(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    top: dict[int, dict[str, torch.Tensor]] = {}
    trunk_index = None
    blocks = {int(m.group(1)) for k in state if (m := _OLD_RDB.match(k))}
    nb = max(blocks) + 1 if blocks else 0
    for key, value in state.items():
        if m := _OLD_RDB.match(key):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        elif key in (f"model.1.sub.{nb}.weight", f"model.1.sub.{nb}.bias"):
            out[f"conv_body.{key.rsplit('.', 1)[1]}"] = value
            trunk_index = nb
        elif m := _OLD_TOP.match(key):
            top.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            raise RRDBLayoutError(f"unexpected key {key!r} for the old ESRGAN layout")
    if trunk_index is None or 0 not in top:
        raise RRDBLayoutError("old ESRGAN layout without its trunk conv (model.1.sub.N) or first conv (model.0)")
    last = max(top)
    if (last - 4) % 3 or last < 4 or (last - 2) not in top:
        raise RRDBLayoutError(f"old ESRGAN layout: the last conv is model.{last}, expected model.4, model.7 or "
                              "model.10 (1x, 2x, 4x)")
    ups = [3 + 3 * i for i in range((last - 4) // 3)]
    names = {0: "conv_first", last - 2: "conv_hr", last: "conv_last",
             **{index: f"conv_up.{i}" for i, index in enumerate(ups)}}
    for index, params in top.items():
        if index not in names:
            raise RRDBLayoutError(f"unexpected conv model.{index} in the old ESRGAN layout")
        for kind, value in params.items():
            out[f"{names[index]}.{kind}"] = value
    return out


def _from_named(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = {"trunk_conv": "conv_body", "conv_body": "conv_body", "upconv1": "conv_up.0", "upconv2": "conv_up.1",
               "conv_up1": "conv_up.0", "conv_up2": "conv_up.1", "HRconv": "conv_hr", "conv_hr": "conv_hr",
               "conv_first": "conv_first", "conv_last": "conv_last",
               "conv_up.0": "conv_up.0", "conv_up.1": "conv_up.1"}  # this module's own names
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := (_BASICSR_RDB.match(key) or _REAL_RDB.match(key)):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
            continue
        head, _, kind = key.rpartition(".")
        if head not in renames or kind not in ("weight", "bias"):
            raise RRDBLayoutError(f"unexpected key {key!r} for the BasicSR / Real-ESRGAN RRDB layout")
        out[f"{renames[head]}.{kind}"] = value
    return out


def infer_shape(state: dict[str, torch.Tensor]) -> RRDBShape:
    """Channels, block count and scale read from a canonical state dict's shapes."""
    try:
        first, last = state["conv_first.weight"], state["conv_last.weight"]
        gc = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as exc:
        raise RRDBLayoutError(f"RRDB state dict without {exc.args[0]!r}") from None
    nb = len({k.split(".")[1] for k in state if k.startswith("body.")})
    n_up = len({k.split(".")[1] for k in state if k.startswith("conv_up.")})
    out_nc, in_nc = last.shape[0], first.shape[1]
    unshuffle = {1: 1, 4: 2, 16: 4}.get(in_nc // out_nc if in_nc % out_nc == 0 else 0)
    if unshuffle is None:
        raise RRDBLayoutError(f"conv_first takes {in_nc} channels for {out_nc} output channels; expected 1x, 4x "
                              "(pixel-unshuffle 2) or 16x (pixel-unshuffle 4)")
    return RRDBShape(in_nc=in_nc, out_nc=out_nc, nf=first.shape[0], gc=gc, nb=nb, n_upsample=n_up,
                     unshuffle=unshuffle)


def build_rrdb(state: dict[str, torch.Tensor]) -> RRDBNet:
    """An RRDBNet holding *state*'s weights (any accepted layout), in eval mode."""
    canonical = canonical_state_dict(state)
    net = RRDBNet(infer_shape(canonical))
    try:
        net.load_state_dict(canonical, strict=True)
    except RuntimeError as exc:
        raise RRDBLayoutError(f"the weights do not fit an RRDB network: {exc}") from None
    return net.eval()
