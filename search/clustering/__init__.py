"""Clustering a team's tickets: groups, readable labels, outliers, and new tickets assigned without refitting.

- fitting.py    numpy + scikit-learn only: KMeans (k by silhouette), PCA + HDBSCAN, prediction, the 2-D map
- labels.py     class-based TF-IDF terms, representative tickets, dominant Jira fields
- runs.py       the ClusteringRun job: start, fit, label, store fenced, match names to the previous run
- assignment.py new tickets and outliers to clusters (ClusterAssignmentJob), texts to clusters, export
"""
