"""Filter pruning on the IR. `lowbit.prune(...)` is the entry point; this package is named `pruning` so that the
function and the package do not shadow each other.

- `groups.py` builds the channel dependency groups (`layout.py`: their data; `flows.py`: how channels flow
  through each kind of op; `heads.py`: attention heads as groups);
- `criteria.py` scores channels (`taylor.py`: the gradients of the Taylor criterion);
- `plan.py` decides what goes (ratios, NNI config_list, round_to);
- `shrink.py` removes it physically; `masks.py` masks it during fine-tuning instead;
- `cost.py` counts parameters and MACs.

Plain functions; the `prune_filters` pass and `lowbit.prune` call them.
"""

from .cost import Cost, cost
from .criteria import CRITERIA
from .groups import ChannelGroups, Group, channel_groups
from .plan import Plan, PruneSpec, plan, prune_graph, resolve_config_list

__all__ = ["Cost", "cost", "CRITERIA", "ChannelGroups", "Group", "channel_groups", "Plan", "PruneSpec", "plan",
           "prune_graph", "resolve_config_list"]
