"""Temporary re-exports while the split of this module (issue #11) lands; nothing new goes here."""

from search.duplicates import *  # noqa: F401,F403
from search.filters import *  # noqa: F401,F403
from search.hybrid import *  # noqa: F401,F403
from search.hybrid import _vector_ranking  # noqa: F401
from search.indexing import *  # noqa: F401,F403
from search.keyword import *  # noqa: F401,F403
from search.tuning import *  # noqa: F401,F403
