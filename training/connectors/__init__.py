"""Connectors that bring tickets into a dataset from the systems that hold them (jira.py: Jira Cloud and Data Center)."""
