"""Reference PyTorch models for the lowbit test suite.

Pure ``torch.nn`` (no torchvision) so tests can build real topologies offline:

* ``resnet18`` and ``mobilenet_v2`` reproduce torchvision's architectures
  (same module names, so a torchvision ``state_dict`` loads, and the same
  parameter counts and initialisation).
* ``DenseNet`` is torchvision's DenseNet topology, small (growing Concats).
* ``ConcatNet``, ``SENet`` and ``TinyViT`` are small models that exercise
  graph patterns the compiler must handle: ``torch.cat`` joins, squeeze-excite
  gating with SiLU/Hardswish/Hardsigmoid and depthwise convs, and hand-written
  multi-head attention.

``REFERENCE_MODELS`` maps a name to ``(factory, example_input_shape)``. Each
factory seeds torch, randomises BatchNorm statistics (so BN folding is not a
no-op) and returns the model in eval mode. Every model is written to be
capturable by ``torch.export`` with a dynamic batch dimension: no Python
control flow on shapes and no in-place ops (ReLU/ReLU6 use ``inplace=False``).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- #
# ResNet18 (torchvision.models.resnet18)
# --------------------------------------------------------------------------- #
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes=1000):
    """torchvision ResNet18: BasicBlocks [2, 2, 2, 2]."""
    return ResNet((2, 2, 2, 2), num_classes)


# --------------------------------------------------------------------------- #
# MobileNetV2 (torchvision.models.mobilenet_v2)
# --------------------------------------------------------------------------- #
def _make_divisible(v, divisor, min_value=None):
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # do not round down by more than 10%
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv2d(bias=False) -> BatchNorm2d -> ReLU6 (torchvision Conv2dNormActivation)."""

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(),
        )
        self.out_channels = out_ch


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x):
        if self.use_res_connect:  # fixed at construction, not shape-dependent
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = [
        # t, c, n, s
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]

    def __init__(self, num_classes=1000, width_mult=1.0, round_nearest=8, dropout=0.2):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in self.SETTING:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel,
                                                  s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes=1000, width_mult=1.0):
    """torchvision MobileNetV2."""
    return MobileNetV2(num_classes, width_mult)


# --------------------------------------------------------------------------- #
# Small test models
# --------------------------------------------------------------------------- #
def _conv_bn_relu(in_ch, out_ch, k=3):
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU())


class InceptionBlock(nn.Module):
    """Four parallel branches joined by torch.cat along channels."""

    def __init__(self, in_ch, b1, b2, b3, pool_proj):
        super().__init__()
        self.branch1 = _conv_bn_relu(in_ch, b1, 1)                        # 1x1
        self.branch2 = nn.Sequential(_conv_bn_relu(in_ch, b2, 1),         # 1x1 -> 3x3
                                     _conv_bn_relu(b2, b2, 3))
        self.branch3 = nn.Sequential(_conv_bn_relu(in_ch, b3, 3),         # 3x3 -> 3x3
                                     _conv_bn_relu(b3, b3, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1),               # pool -> 1x1
                                     _conv_bn_relu(in_ch, pool_proj, 1))
        self.out_channels = b1 + b2 + b3 + pool_proj

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x),
                          self.branch3(x), self.branch4(x)], dim=1)


class ConcatNet(nn.Module):
    """Small Inception-style CNN: stem, two cat-joined blocks, global pool, linear."""

    def __init__(self, num_classes=10, in_ch=1):
        super().__init__()
        self.stem = _conv_bn_relu(in_ch, 16, 3)
        self.block1 = InceptionBlock(16, 8, 8, 4, 4)                      # -> 24 ch
        self.pool = nn.MaxPool2d(2)
        self.block2 = InceptionBlock(self.block1.out_channels, 8, 12, 6, 6)  # -> 32 ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.block2.out_channels, num_classes)

    def forward(self, x):
        x = self.block1(self.stem(x))
        x = self.block2(self.pool(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeExcite(nn.Module):
    """avg pool -> 1x1 conv -> SiLU -> 1x1 conv -> Hardsigmoid -> scale input."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        squeezed = max(1, channels // reduction)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))
        return x * s


class SENet(nn.Module):
    """Small MobileNetV3-like CNN with depthwise conv and squeeze-excite blocks."""

    def __init__(self, num_classes=10, in_ch=1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise
            nn.BatchNorm2d(16),
            nn.Hardswish(),
            SqueezeExcite(16),
            nn.Conv2d(16, 32, 1, bias=False),                         # pointwise
            nn.BatchNorm2d(32),
            nn.Hardswish(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False),
            nn.BatchNorm2d(32),
            nn.SiLU(),
            SqueezeExcite(32),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Attention(nn.Module):
    """Multi-head self-attention with a single qkv projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                      # (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(),
                                 nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Small Vision Transformer with a cls token and learned position embedding."""

    def __init__(self, num_classes=10, image_size=8, patch_size=2, in_ch=1,
                 dim=32, depth=2, heads=4, mlp_ratio=2):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_ch, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)   # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class DenseLayer(nn.Module):
    """torchvision's _DenseLayer: BN-ReLU-1x1 conv-BN-ReLU-3x3 conv over the concat of all earlier features."""

    def __init__(self, in_ch, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, layers, in_ch, growth, bn_size):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_ch + i * growth, growth, bn_size) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """torchvision's DenseNet topology, small: a stem, dense blocks whose layers read the Concat of every
    earlier feature map (growing Concats, pre-activation BN after each), transitions with 1x1 conv + avg pool."""

    def __init__(self, num_classes=10, in_ch=3, growth=12, blocks=(3, 3, 3), stem=24, bn_size=4):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_ch, stem, 3, padding=1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(stem))
        self.features.add_module("relu0", nn.ReLU())
        ch = stem
        for i, n in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(n, ch, growth, bn_size))
            ch += n * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", nn.Sequential(
                    nn.BatchNorm2d(ch), nn.ReLU(), nn.Conv2d(ch, ch // 2, 1, bias=False), nn.AvgPool2d(2, 2)))
                ch //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(ch))
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Decoder(nn.Module):
    """A segmentation encoder-decoder (U-Net style, small): a strided encoder, ConvTranspose upsampling with
    BN and ReLU, a skip Concat of the encoder's features with the upsampled ones, a depthwise ConvTranspose, a
    1x1 projection into a grouped ConvTranspose, and a 1x1 head that gives a map of class scores."""

    def __init__(self, classes=5, in_ch=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(32, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.smooth = nn.ConvTranspose2d(24, 24, 3, padding=1, groups=24)
        self.project = nn.Conv2d(24, 12, 1)
        self.mix = nn.ConvTranspose2d(12, 12, 1, groups=2)
        self.head = nn.Conv2d(12, classes, 1)

    def forward(self, x):
        skip = self.stem(x)
        y = torch.cat([skip, self.up(self.down(skip))], 1)
        y = self.project(F.relu(self.smooth(self.fuse(y))))
        return self.head(F.relu(self.mix(y)))


class GroupedBottleneck(nn.Module):
    """ResNeXt's bottleneck: 1x1 conv -> grouped 3x3 conv (`groups` blocks, `width` -> `out` channels) -> 1x1
    conv, each with BN, and a residual Add (through a 1x1 shortcut where the widths differ)."""

    def __init__(self, ch, width, out, groups):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(ch, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(width, out, 3, padding=1, groups=groups, bias=False),
                                     nn.BatchNorm2d(out), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(out, ch, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x):
        return F.relu(x + self.expand(self.grouped(self.reduce(x))))


class ResNeXt(nn.Module):
    """A small ResNeXt: a stem, two grouped bottlenecks (4 blocks of width/4 -> width/4 channels; 4 blocks of
    width/4 -> width/2), a depthwise conv with two filters per channel (a grouped conv of 1 -> 2 per block;
    without it where `spread` is False: Torch-Pruning 1.6 fails on it), global pool, linear. `stride` 2 halves
    the stem's resolution."""

    def __init__(self, num_classes=10, in_ch=1, width=16, stride=1, spread=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = GroupedBottleneck(width, width, width, groups=4)
        self.block2 = GroupedBottleneck(width, width, 2 * width, groups=4)
        self.spread = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, groups=width), nn.BatchNorm2d(2 * width),
                                    nn.ReLU()) if spread else nn.Identity()
        self.fc = nn.Linear(2 * width if spread else width, num_classes)

    def forward(self, x):
        y = self.spread(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


# --------------------------------------------------------------------------- #
# Registry of deterministic, eval-mode reference models
# --------------------------------------------------------------------------- #
def randomize_batchnorm(model, seed=0):
    """Give every BatchNorm non-trivial (deterministic) affine params and statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * (torch.rand(n, generator=g) - 0.5))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.75 + 0.5 * torch.rand(n, generator=g))
    return model


def _reference(build):
    def factory():
        torch.manual_seed(0)
        return randomize_batchnorm(build()).eval()
    return factory


# name -> (factory returning an eval-mode model, example input shape)
REFERENCE_MODELS = {
    "resnet18": (_reference(lambda: resnet18(num_classes=10)), (2, 3, 32, 32)),
    "mobilenet_v2": (_reference(lambda: mobilenet_v2(num_classes=10)), (2, 3, 32, 32)),
    "concat": (_reference(lambda: ConcatNet(num_classes=10, in_ch=1)), (2, 1, 8, 8)),
    "se": (_reference(lambda: SENet(num_classes=10, in_ch=1)), (2, 1, 8, 8)),
    "vit": (_reference(lambda: TinyViT(num_classes=10, image_size=8, in_ch=1)), (2, 1, 8, 8)),
    "densenet": (_reference(lambda: DenseNet(num_classes=10, in_ch=3)), (2, 3, 32, 32)),
    "resnext": (_reference(lambda: ResNeXt(num_classes=10, in_ch=1)), (2, 1, 8, 8)),
}
