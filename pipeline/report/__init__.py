"""The results: the aggregate stage (tables, comparisons, summary.json) and the report stage (figures)."""
