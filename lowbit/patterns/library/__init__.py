"""The built-in pattern library: one concern per file, each ending in `rules = RuleSet([...])`."""
