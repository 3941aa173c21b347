"""The hierarchical spine pipeline: classify the scan, segment the cord, segment lesions in it,
measure, and report (see ARCHITECTURE.md: above inference, evaluation and training, below the CLI)."""
