"""Facts training announces; search reacts in search/receivers.py (training never imports search).

Both are sent synchronously inside the sender's transaction, so a receiver's
writes commit or roll back with the fact they react to.
"""

from django.dispatch import Signal

# A dataset was created from its first import (version 1): kwargs dataset, version. Sent inside the
# import's transaction; search queues a base-model index so the dataset is searchable at once.
dataset_created = Signal()

# A dataset got a new version (upload, links upload, Jira sync): kwargs dataset, version.
dataset_version_added = Signal()

# A trained model was registered: kwargs version, embeddings = (document ids, vectors) or None —
# the corpus vectors the run's held-out evaluation already computed, so they are not encoded again.
model_version_registered = Signal()

# The champion/challenger guard of a retrain approved a version (training.retraining): kwargs version, user,
# decision (the guard's numbers). Search requests its promotion (search.receivers); the switch happens once
# its index is ready, as for any promotion.
promotion_approved = Signal()
