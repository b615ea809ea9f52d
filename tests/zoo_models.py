"""HuggingFace transformers architectures built from their configs (random weights, no download).

`build(name, size)` gives (module, make_input, model_type): the module returns
the architecture's last hidden state as one tensor; make_input(batch) gives
one input (token ids for the text models, an image for the vision ones).
size="small" is a few layers and a narrow width, for the test suite;
size="full" is the configuration's defaults (BERT-base, GPT-2 small, T5-small's encoder,
ViT-B/16, Swin-T, ConvNeXt-T, ResNet-50, MobileNetV2 1.0; EfficientNet-B0 and, for Llama,
SmolLM-135M's shape), for bench/zoo.py.

Weights are drawn wider than HuggingFace's initialiser (std 0.02, BatchNorm
at identity): at that scale every branch is tiny next to the residual
stream, a MobileNetV2 outputs ~1e-25, and any quantizer looks exact. BatchNorm
scales stay below 1 (0.3-0.8): at 0.5-1.5 a 50-layer MobileNetV2 is chaotic, a
1-LSB rounding difference grows to 16 dB at its output and the quantized
model is 15 dB from FP32, which no trained model is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

TEXT = ("bert", "distilbert", "gpt2", "llama", "t5")
VISION = ("vit", "swin", "convnext", "resnet", "mobilenet_v2", "efficientnet", "regnet")
ARCHITECTURES = TEXT + VISION
TRANSFORMERS = ("bert", "distilbert", "gpt2", "llama", "t5", "vit", "swin")
VOCAB, SEQ = 100, 12
# a small Llama-shaped decoder (4 query heads sharing 2 key/value heads); Qwen2 and Mistral configs take it too
SMALL_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)


def _small_config(name: str):
    import transformers as tf

    return {
        "bert": lambda: tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, initializer_range=0.2),
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                  max_position_embeddings=64, initializer_range=0.2),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      initializer_range=0.1, bos_token_id=0, eos_token_id=0),
        # RMSNorm, rotary embeddings, grouped-query attention, SwiGLU: Llama, Qwen2 and Mistral are built so
        "llama": lambda: tf.LlamaConfig(**SMALL_DECODER),
        # T5's encoder: RMS-style LayerNorm without a bias, relative-position buckets (log, min, where, casts)
        "t5": lambda: tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        "vit": lambda: tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, initializer_range=0.2),
        "swin": lambda: tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 2],
                                      window_size=4, initializer_range=0.2),
        "convnext": lambda: tf.ConvNextConfig(image_size=32, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                              initializer_range=0.2),
        "resnet": lambda: tf.ResNetConfig(image_size=32, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                          layer_type="bottleneck"),
        "mobilenet_v2": lambda: tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, initializer_range=0.2),
        # top BatchNorm width = the top conv's (1280 x width 0.25); convs with padding="same", SiLU, squeeze-excite
        "efficientnet": lambda: tf.EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.25,
                                                      hidden_dim=320, initializer_range=0.2),
        # RegNet-Y: grouped 3x3 convolutions (group width 8) under squeeze-excite
        "regnet": lambda: tf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], groups_width=8,
                                          layer_type="y"),
    }[name]()


def _full_config(name: str):
    import transformers as tf

    if name == "efficientnet":  # the class's defaults are B7's widths at B0's resolution: B0 itself
        return tf.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280)
    if name == "llama":  # the class's defaults are Llama-2-7B's: SmolLM-135M's published shape instead
        return tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                              rms_norm_eps=1e-5, tie_word_embeddings=True)
    return {"bert": tf.BertConfig, "distilbert": tf.DistilBertConfig, "gpt2": tf.GPT2Config, "t5": tf.T5Config,
            "vit": tf.ViTConfig,
            "swin": tf.SwinConfig, "convnext": tf.ConvNextConfig, "resnet": tf.ResNetConfig,
            "mobilenet_v2": tf.MobileNetV2Config, "regnet": tf.RegNetConfig}[name]()


def _model_class(name: str):
    import transformers as tf

    return {"bert": tf.BertModel, "distilbert": tf.DistilBertModel, "gpt2": tf.GPT2Model, "llama": tf.LlamaModel,
            "t5": tf.T5EncoderModel, "vit": tf.ViTModel,
            "swin": tf.SwinModel, "convnext": tf.ConvNextModel, "resnet": tf.ResNetModel,
            "mobilenet_v2": tf.MobileNetV2Model, "efficientnet": tf.EfficientNetModel, "regnet": tf.RegNetModel}[name]


class LastHiddenState(nn.Module):
    """A transformers model as a plain tensor -> tensor module (its last hidden state, without the cache)."""

    def __init__(self, model: nn.Module, text: bool):
        super().__init__()
        self.model = model
        self.text = text

    def forward(self, x):
        decoder = self.text and any(k in type(self.model).__name__ for k in ("GPT2", "Llama"))
        out = self.model(x, use_cache=False) if decoder else self.model(x)
        return out.last_hidden_state


def _liven(model: nn.Module, seed: int) -> None:
    """Convolutions and BatchNorms away from HuggingFace's near-identity initialisation (see the docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.3 + 0.5 * torch.rand(n, generator=g))  # gain < 1: 50 layers stay stable
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def build(name: str, size: str = "small", seed: int = 0):
    """(module in eval mode, make_input(batch) -> tensor, model_type for lowbit/NNCF)."""
    torch.manual_seed(seed)
    config = _small_config(name) if size == "small" else _full_config(name)
    model = _model_class(name)(config).eval()
    if name in VISION:
        _liven(model, seed)
    module = LastHiddenState(model, name in TEXT).eval()
    g = torch.Generator().manual_seed(seed + 1)
    if name in TEXT:
        seq = SEQ if size == "small" else 128
        vocab = config.vocab_size

        def make_input(batch: int = 1) -> torch.Tensor:
            return torch.randint(0, vocab, (batch, seq), generator=g)
    else:
        side = getattr(config, "image_size", 32) if size == "small" else 224  # RegNet's config has no size

        def make_input(batch: int = 1) -> torch.Tensor:
            return torch.randn(batch, 3, side, side, generator=g)
    return module, make_input, "transformer" if name in TRANSFORMERS else None
