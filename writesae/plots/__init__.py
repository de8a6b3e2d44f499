"""Figures of the book: one function per figure, each taking tidy tables and returning a matplotlib Figure."""
