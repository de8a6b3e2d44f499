"""``python -m writesae.hosts``: print the tables of every layer rule and hosted model type (the README's and the
method page's)."""
from . import family_table

print(family_table(), end="")
