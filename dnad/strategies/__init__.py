"""The built-in search strategies; importing this package registers them (`dnad.search.STRATEGIES`).

A new strategy: one module here with a class decorated `@register_strategy("name")` (subclassing
`dnad.search.EpochSearch` for a training search), imported below.
"""

from dnad.strategies import darts, random_search, snps

__all__ = ["darts", "random_search", "snps"]
