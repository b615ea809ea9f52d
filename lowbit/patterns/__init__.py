"""The pattern language, the rewrite engine, and the built-in pattern library.

    from lowbit.patterns import P, Any, Const, Opt, Rule, RuleSet, explain
"""

from .pattern import Any, Const, OneOf, Opt, P, Pattern, match_at
from .rewrite import Match, Rule, RuleSet, explain, remove_dead

__all__ = ["Any", "Const", "OneOf", "Opt", "P", "Pattern", "match_at", "Match", "Rule", "RuleSet", "explain",
           "remove_dead"]
