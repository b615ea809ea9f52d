"""Small torch modules that, between them, use every aten op the torch frontend maps.

Each entry of `OP_MODELS` is name -> (factory, example input tuple, ops the
lowered graph must contain). Tests lower them and check exact round trips
and cross-backend agreement.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, dilation=1)
        self.dilated = nn.Conv2d(8, 4, 3, padding=2, dilation=2)
        # padding="same" with an even kernel: pads differ at the two ends (EfficientNet's convs use "same")
        self.same = nn.Conv2d(4, 4, (2, 3), padding="same", dilation=(1, 2))
        self.valid = nn.Conv2d(4, 4, 1, padding="valid")
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        y = self.c1(x.flatten(2))                      # 1d conv on [B, 4, 64]
        y = y.view(y.shape[0], 8, 8, 8)
        y = F.relu(self.bn(self.grouped(y)))
        y = F.relu6(self.depthwise(y))
        return self.valid(self.same(F.hardtanh(self.dilated(y), -0.5, 0.5)))


class Pools(nn.Module):
    def forward(self, x):
        a = F.max_pool2d(x, 3, stride=2, padding=1)
        b = F.avg_pool2d(x, 2)
        c = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False, ceil_mode=True)
        g = F.adaptive_avg_pool2d(x, 1).flatten(1) + F.avg_pool2d(x, 16, ceil_mode=True).flatten(1)  # a kernel
        # wider than the map (HuggingFace's EfficientNet pooler): the runtimes refuse it as an AveragePool
        m = x.mean(dim=(2, 3))
        return a.sum() + b.mean((1, 2, 3), keepdim=True).squeeze(-1).squeeze(-1).squeeze(-1), c, g - m


class Activations(nn.Module):
    def forward(self, x):
        return (F.gelu(x) + F.gelu(x, approximate="tanh") - F.silu(x) * F.hardswish(x)
                + torch.sigmoid(x) / (2.0 + torch.tanh(x).abs()) + F.hardsigmoid(x)
                + torch.clamp(x, min=-0.25, max=0.75) + torch.clamp(x, min=0.1) - x * 3 + 1.5 - x / 7)


class Linears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc2d = nn.Linear(16, 12)
        self.fc3d = nn.Linear(12, 6)
        self.nobias = nn.Linear(6, 6, bias=False)
        self.ln = nn.LayerNorm(6)

    def forward(self, x):                              # x: [B, 16]
        y = self.fc2d(x)
        z = self.fc3d(y.unsqueeze(1).expand(-1, 3, -1))
        z = self.ln(self.nobias(z)) + F.layer_norm(z, (6,))  # the second has no affine weight
        w = torch.matmul(z, z.transpose(1, 2))           # [B, 3, 3]
        return torch.bmm(w, z).softmax(-1), F.log_softmax(y, dim=1)


class Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.drop = nn.Dropout(0.3)

    def forward(self, tokens):                          # tokens: [B, 6] int64
        e = self.drop(self.emb(tokens))                  # [B, 6, 8]
        a, b = e.chunk(2, dim=-1)
        c, d, f = torch.split(e, [2, 3, 1], dim=1)
        p = e.permute(0, 2, 1).reshape(e.shape[0], -1)
        s = e[:, 1:5:2, :3] + e.select(1, 0).unsqueeze(1)[..., :3]
        return torch.cat([a, b * 2], dim=-1), p, s, c.sum(1) - d.mean(1) + f.squeeze(1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):                              # x: [B, 5, 16]
        q, k, v = self.qkv(x).reshape(x.shape[0], 5, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        mask = torch.ones(5, 5, dtype=torch.bool).tril()
        a = F.scaled_dot_product_attention(q, k, v)
        b = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        c = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
        return (a + b + c).transpose(1, 2).reshape(x.shape[0], 5, 16)


class Windows(nn.Module):
    """Swin's shifted windows: torch.roll over two dims and over one, and masks filled with masked_fill."""

    def forward(self, x):                              # x: [B, 6, 4, 3]
        shifted = torch.roll(x, shifts=(-2, 1), dims=(1, 2))
        back = torch.roll(shifted, shifts=2, dims=1)
        mask = x[..., :1] > 0
        return shifted.masked_fill(mask, -100.0) + back.masked_fill(mask, torch.tensor(0.5))


class Rotary(nn.Module):
    """Llama's rotary embedding (sin and cos of positions times frequencies, rotate-half), with the pass-through
    part empty as when every dim rotates (Phi-3), and T5's relative-bucket ops (full_like, torch.min/max of two
    tensors, torch.where with a number)."""

    def forward(self, x):                              # x: [B, 6, 8]
        positions = torch.arange(x.shape[1], dtype=torch.float32)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        rot, kept = x[..., :8], x[..., 8:]               # kept has no dims: every dim rotates
        half = torch.cat([-rot[..., 4:], rot[..., :4]], dim=-1)
        y = torch.cat([rot * angles.cos() + half * angles.sin(), kept], dim=-1)
        capped = torch.max(torch.min(y, torch.full_like(y, 0.5)), x - 1.0)
        return torch.where(y > 0, capped, 0.25)


class Promotions(nn.Module):
    """Type promotion in binary ops (float16 x float32, int / int) and T5's float16 overflow guard: isinf, any,
    torch.where of two numbers, clamp with tensor bounds."""

    def forward(self, x):                              # x: [B, 6, 8]
        h = x.half()                                     # (no float16 arithmetic: runtimes round it differently)
        scaled = h * x.pow(2).mean(-1, keepdim=True)    # float16 x float32 -> float32
        guard = torch.where(torch.isinf(h).any(), 0.5, 1.5)
        clamped = torch.clamp(h, min=-guard, max=guard)  # float16 clamped by float32 0-d bounds
        steps = torch.arange(8) / 2 + torch.arange(8) / torch.arange(1, 9)  # int / int -> float32 (true division)
        return scaled + steps, clamped


class Tensors(nn.Module):
    """What transformers models build tensors with: type_as (Gemma), .T (Falcon), reshape_as (LeViT), ones and
    zeros of the batch's size and ~ of a bool mask (OPT, DeBERTa), stack and repeat_interleave (GPT-J's rotary),
    repeat by the batch (Bloom's ALiBi), softmax in a given dtype (Gemma-2)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))

    def forward(self, x):                              # x: [B, 6, 8]
        b = x.shape[0]
        mask = torch.ones(b, 6, dtype=torch.int64) > torch.zeros(b, 6, dtype=torch.int64)
        y = (x @ self.w.T).type_as(x).masked_fill(~mask[:, :, None], 0.0)                # [B, 6, 6]
        pairs = torch.stack([-y[..., 1::2], y[..., ::2]], dim=-1).reshape_as(y)       # rotate every pair
        slopes = torch.arange(1.0, 4.0)[:, None, None].repeat(b, 1, 6)                  # [3B, 1, 6]
        doubled = x[..., :3].repeat_interleave(2, dim=-1)                               # [B, 6, 6]
        scores = torch.softmax(pairs + doubled, dim=-1, dtype=torch.float32)
        return scores, slopes


class Products(nn.Module):
    """Bloom's scores, baddbmm(alibi, q, k, beta, alpha), and ConvNeXt-V2's global response norm (the L2 norm over
    the spatial dims) beside an L1 norm."""

    def forward(self, x):                              # x: [B, 6, 8]
        scores = torch.baddbmm(x[:, :, :1], x, x.transpose(1, 2), beta=0.5, alpha=0.25)   # [B, 6, 6]
        l2 = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        l1 = torch.linalg.vector_norm(x, ord=1, dim=-1)
        return scores, x / (l2 + 1e-6), l1


class Layers(nn.Module):
    """Group norm (PoolFormer, wav2vec2), a weight-normed conv (wav2vec2's positional conv) and upsampling,
    bilinear with and without align_corners and nearest (BEiT, MobileViT, FPN necks)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.utils.weight_norm(nn.Conv2d(4, 4, 3, padding=1), dim=2)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):                              # x: [B, 4, 5, 6]
        y = self.conv(self.norm(x))
        up = F.interpolate(y, size=(7, 9), mode="bilinear", align_corners=False)
        corners = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
        near = F.interpolate(y, scale_factor=2, mode="nearest")
        return up, corners + near


class ComputedIndex(nn.Module):
    """BEiT's relative position index, built at forward time: meshgrid, in-place adds into select views, a copy
    into a slice of zeros, then read through a view of those zeros. Opaque ops on constants alone: computed by
    torch at lowering, so that ONNX and OpenVINO get the index as a constant."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 3))

    def forward(self, x):                              # x: [B, 3, 4]
        coords = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        relative[:, :, 0] += 1
        relative[:, :, 1] += 1
        relative[:, :, 0] *= 3
        index = torch.zeros(5, 5, dtype=torch.long)
        index[1:, 1:] = relative.sum(-1)
        index[0, 0] = 9
        bias = self.table[index.view(-1)].view(5, 5, 3)[:3, :4]      # [3, 4, 3]
        return x + bias.permute(2, 0, 1)[None].sum(1)


class Upsampling(nn.Module):
    """A decoder's transposed convolutions: 2-D with padding, output_padding and groups, 1-D dilated, no bias."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.wave = nn.ConvTranspose1d(6, 3, 2, stride=2, dilation=2, bias=False)

    def forward(self, x):
        y = torch.relu(self.up(x))                                      # [b, 6, 16, 16]
        return self.wave(y.mean(-1))                                   # [b, 3, 34]


class Opaque(nn.Module):
    """Uses ops outside the vocabulary (cummax, flip): they must survive as opaque nodes."""

    def forward(self, x):
        return torch.cummax(x, dim=1).values.flip(-1) + 1


class Structured(nn.Module):
    """Returns a nested structure, not a single tensor."""

    def forward(self, x):
        return {"double": x * 2, "pair": (x + 1, x.relu())}


OP_MODELS = {
    "convs": (Convs, lambda b: (torch.randn(b, 4, 8, 8),), {"Conv", "BatchNormalization", "Relu", "Clip"}),
    "pools": (Pools, lambda b: (torch.randn(b, 3, 8, 8),),
              {"MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Squeeze"}),
    "activations": (Activations, lambda b: (torch.randn(b, 5, 7),),
                    {"Gelu", "Swish", "HardSwish", "Sigmoid", "Tanh", "HardSigmoid", "Clip", "Div", "Sub"}),
    "linears": (Linears, lambda b: (torch.randn(b, 16),),
                {"Gemm", "MatMul", "Add", "LayerNormalization", "Softmax", "LogSoftmax", "Expand"}),
    "shapes": (Shapes, lambda b: (torch.randint(0, 20, (b, 6)),),
               {"Gather", "Dropout", "Split", "Transpose", "Reshape", "Slice", "Concat", "Unsqueeze"}),
    "attention": (Attention, lambda b: (torch.randn(b, 5, 16),), {"Attention", "Transpose", "Reshape"}),
    "windows": (Windows, lambda b: (torch.randn(b, 6, 4, 3),), {"Slice", "Concat", "Where", "Greater"}),
    "promotions": (Promotions, lambda b: (torch.randn(b, 6, 8),), {"Cast", "Clip", "Abs", "Equal", "ReduceSum"}),
    "rotary": (Rotary, lambda b: (torch.randn(b, 6, 8),), {"Sin", "Cos", "Range", "Min", "Max", "Expand", "Where"}),
    "products": (Products, lambda b: (torch.randn(b, 6, 8),), {"MatMul", "ReduceSum", "Sqrt", "Abs"}),
    "layers": (Layers, lambda b: (torch.randn(b, 4, 5, 6),), {"LayerNormalization", "Resize", "ReduceSum"}),
    "computed_index": (ComputedIndex, lambda b: (torch.randn(b, 3, 4),), {"Gather", "Reshape"}),
    "tensors": (Tensors, lambda b: (torch.randn(b, 6, 8),), {"Not", "Expand", "Concat", "Shape", "Reshape", "MatMul"}),
    "upsampling": (Upsampling, lambda b: (torch.randn(b, 4, 8, 8),), {"ConvTranspose", "Relu", "ReduceMean"}),
}
# models whose ops lower to several ONNX ops that round differently from torch's fused kernel (baddbmm's
# product and sum, vector_norm's sum of squares, group and weight norm): their torch round trip is exact to a
# float32 rounding only
ROUNDED = {"products", "layers"}
