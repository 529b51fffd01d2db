"""Token merging for diffusion models: ToMe, ReToM and ToDo behind one interface.

Read in this order: :mod:`.algorithms` (pure functions: a merge :class:`Plan` and the
merge/unmerge it defines), :mod:`.interface` (what a model calls once per transformer
block: :class:`MergeMethod` and :class:`BlockMerge`), :mod:`.methods` (the three configs,
which validate their fields and delegate to the algorithms, and the registry
:data:`METHODS` / :func:`from_options`).
"""
from .algorithms import (Plan, matching_plan, plan_functions, retom_plan,
                         retom_representatives, todo_pool, tome_dst_mask, tome_plan,
                         window_tables)
from .interface import (BlockMerge, MergeMethod, grid_for, level_grid, level_of,
                        loop_segments)
from .methods import METHOD_OPTIONS, METHODS, ReToM, ToDo, ToMe, from_options

__all__ = [
    # the methods and the registry
    "ToMe", "ReToM", "ToDo", "METHODS", "METHOD_OPTIONS", "from_options",
    # the interface a model calls
    "MergeMethod", "BlockMerge", "grid_for", "level_of", "level_grid", "loop_segments",
    # the algorithms
    "Plan", "matching_plan", "plan_functions", "tome_dst_mask", "tome_plan",
    "retom_representatives", "retom_plan", "todo_pool", "window_tables",
]
