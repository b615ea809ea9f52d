"""Writing a pass in a few lines: rewrite `x * sigmoid(x)` into one `Swish` op, run it through compile.

    python examples/custom_pass.py

Prints what the rule did and where the dump of every pass is (open
index.html there to see the diff of the new pass).
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn as nn

import lowbit
from lowbit.passes import Pass, PassResult, register_pass
from lowbit.patterns import Any, P, Rule, RuleSet

# 1. A rule: a pattern (data) and what replaces its root. Both Any("x") bind the same value.
x = Any("x")
swish = Rule("swish", P("Mul", x, P("Sigmoid", x)), lambda m: m.op("Swish", [m["x"]]))


# 2. A pass that applies it (registered, so pipelines can name it).
@register_pass
class FuseSwish(Pass):
    name = "fuse_swish"

    def __call__(self, graph, ctx):
        fired = RuleSet([swish]).apply(graph)
        return PassResult(graph, changed=bool(fired), fired=fired)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(y)          # written out by hand, as older code often does


def main() -> None:
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    dump = tempfile.mkdtemp(prefix="lowbit-custom-pass-")
    compiled = lowbit.compile(model, passes=["cleanup", "fuse_swish", "fuse"], example_inputs=(x,), dump_dir=dump)
    print(open(f"{dump}/02-fuse_swish.diff").read().split("\n# unified diff")[0])
    with torch.no_grad():
        print("max |difference| against the original:", float((compiled(x) - model(x)).abs().max()))
    print(f"dumps: {dump}/index.html")


if __name__ == "__main__":
    main()
