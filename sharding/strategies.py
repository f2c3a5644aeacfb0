"""The sharding strategies' names, without torch: the config schema checks
``sharding.strategy`` against them before anything heavy is imported."""

STRATEGIES = (
    "auto",
    "table_wise",
    "row_wise",
    "column_wise",
    "table_row_wise",
    "table_column_wise",
    "grid",
    "data_parallel",
)
# Strategies that split a table inside a host and need several hosts to mean anything.
HIERARCHICAL = ("table_row_wise", "table_column_wise", "grid")
