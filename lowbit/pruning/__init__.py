"""Filter pruning on the IR (`lowbit.prune(...)` is the entry point; this package is named `pruning` so that the
function and the package do not shadow each other): channel dependency groups (`groups.py`), importance criteria (`criteria.py`), the
plan of what goes (`plan.py`) and the physical shrink (`shrink.py`). Plain functions; the `prune_filters` pass
and `lowbit.prune` call them."""

from .cost import Cost, cost
from .criteria import CRITERIA
from .groups import ChannelGroups, Group, channel_groups
from .plan import Plan, PruneSpec, plan, prune_graph, resolve_config_list

__all__ = ["Cost", "cost", "CRITERIA", "ChannelGroups", "Group", "channel_groups", "Plan", "PruneSpec", "plan", "prune_graph",
           "resolve_config_list"]
