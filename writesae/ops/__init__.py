"""Pure math of the write rules (no model code): recurrences with cache edits."""
